//! Tenant state sync against the real Docker engine with a local sink,
//! driven as a new user would: files written with `docker exec`, `bh`
//! for release and status, kill -9 and SIGTERM of the server.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use tonic::Code;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_testkit::docker::{
    remove_node_containers, require_docker, test_image, unique_node,
};
use boilerhouse_testkit::{
    AgentOptions, AgentProcess, ServerOptions, ServerProcess, eventually, grpcurl_available,
    stderr, stdout,
};

const WAIT: Duration = Duration::from_secs(60);

const CONFIG: &str = r#"
heartbeat_interval = "200ms"
suspect_after = "5s"
final_sync_deadline = "20s"
"#;

struct Cluster {
    docker: bollard::Docker,
    server: ServerProcess,
    agent: AgentProcess,
    node: String,
    root: tempfile::TempDir,
    sink: PathBuf,
}

/// A workload `id` syncing its whole state directory with `sink`.
fn workload(image: &str, id: &str, sink: &Path, policy: &str) -> String {
    format!(
        "id: {id}\nimage: {image}\ncommand: [sleep, infinity]\n\
         volumes: {{state: {{target: /state}}}}\n\
         pool: {{min_size: 1, max_size: 4, affinity_timeout: 2s}}\n\
         sync:\n  sink: {{type: local, path: {}, prefix: \"tenants/${{tenantId}}\"}}\n\
         \x20 mappings: [{{path: ., direction: bidirectional}}]\n\
         \x20 policy: {policy}\n",
        sink.display()
    )
}

impl Cluster {
    /// A server and one agent; `workloads` gets the image and sink and
    /// returns (file name, yaml) pairs.
    async fn start(workloads: impl Fn(&str, &Path) -> Vec<(String, String)>) -> Option<Self> {
        let docker = require_docker().await?;
        let image = test_image(&docker).await.unwrap();
        let root = tempfile::tempdir().unwrap();
        let sink = root.path().join("sink");
        std::fs::create_dir_all(root.path().join("workloads")).unwrap();
        for (name, yaml) in workloads(&image, &sink) {
            std::fs::write(root.path().join("workloads").join(name), yaml).unwrap();
        }
        let server = ServerProcess::start_in(
            root.path(),
            ServerOptions {
                config_toml: Some(CONFIG.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let node = unique_node("sync");
        let agent = AgentProcess::start(AgentOptions::new(
            &node,
            server.url(),
            root.path().join("agent"),
        ))
        .unwrap();
        let c = Self {
            docker,
            server,
            agent,
            node,
            root,
            sink,
        };
        c.wait_ready().await;
        Some(c)
    }

    async fn wait_ready(&self) {
        let nodes =
            pb::node_service_client::NodeServiceClient::new(self.server.channel().await.unwrap());
        eventually(WAIT, "the node to be ready", || {
            let mut nodes = nodes.clone();
            async move {
                let listed = nodes
                    .list_nodes(pb::ListNodesRequest::default())
                    .await
                    .ok()?
                    .into_inner()
                    .nodes;
                listed
                    .iter()
                    .any(|n| n.status == pb::NodeStatus::Ready as i32 && n.connected)
                    .then_some(())
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.server.log()));
    }

    async fn try_claim(
        &self,
        tenant: &str,
        workload: &str,
    ) -> Result<pb::ClaimInfo, tonic::Status> {
        Ok(
            ClaimServiceClient::new(self.server.channel().await.unwrap())
                .claim(pb::ClaimRequest {
                    tenant_id: tenant.into(),
                    workload_id: workload.into(),
                    acquire_timeout: Some(prost_types::Duration {
                        seconds: 60,
                        nanos: 0,
                    }),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .claim
                .unwrap(),
        )
    }

    async fn claim(&self, tenant: &str, workload: &str) -> pb::ClaimInfo {
        self.try_claim(tenant, workload)
            .await
            .unwrap_or_else(|e| panic!("claim: {e}\n{}", self.server.log()))
    }

    fn bh_ok(&self, args: &[&str]) -> String {
        let out = self.server.bh(args);
        assert!(
            out.status.success(),
            "bh {args:?} failed: {}\n{}",
            stderr(&out),
            self.server.log()
        );
        stdout(&out)
    }

    /// Runs a shell script in a container and returns its output once it
    /// has finished.
    async fn exec(&self, docker_id: &str, script: &str) -> String {
        let exec = self
            .docker
            .create_exec(
                docker_id,
                bollard::models::ExecConfig {
                    cmd: Some(vec!["sh".into(), "-c".into(), script.into()]),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let mut text = String::new();
        if let bollard::exec::StartExecResults::Attached { mut output, .. } =
            self.docker.start_exec(&exec.id, None).await.unwrap()
        {
            while let Some(Ok(chunk)) = output.next().await {
                text.push_str(&chunk.to_string());
            }
        }
        text
    }

    fn sink_file(&self, tenant: &str, path: &str) -> Option<String> {
        std::fs::read_to_string(self.sink.join("tenants").join(tenant).join(path)).ok()
    }

    async fn wait_sink(&self, tenant: &str, path: &str, want: &str, what: &str) {
        eventually(WAIT, what, || async {
            (self.sink_file(tenant, path).as_deref() == Some(want)).then_some(())
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}: sink has {:?}\n{}",
                self.sink_file(tenant, path),
                self.server.log()
            )
        });
    }

    async fn docker_exists(&self, docker_id: &str) -> bool {
        self.docker.inspect_container(docker_id, None).await.is_ok()
    }

    async fn statuses(&self, tenant: &str) -> Vec<pb::SyncStatus> {
        pb::sync_service_client::SyncServiceClient::new(self.server.channel().await.unwrap())
            .get_sync_status(pb::GetSyncStatusRequest {
                tenant_id: tenant.into(),
                workload_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .statuses
    }

    async fn start_server(&mut self, listen: std::net::SocketAddr) {
        self.server = ServerProcess::start_in(
            self.root.path(),
            ServerOptions {
                config_toml: Some(CONFIG.into()),
                listen: Some(listen),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }

    fn events(&self, kind: &str) -> String {
        self.bh_ok(&["events", "--kind", kind])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.agent.kill();
        self.server.kill();
        let docker = self.docker.clone();
        let node = self.node.clone();
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(remove_node_containers(&docker, &node))
        })
        .join()
        .ok();
    }
}

#[tokio::test]
async fn files_follow_the_tenant_to_a_new_container_after_the_reservation_expires() {
    let Some(c) = Cluster::start(|image, sink| {
        vec![(
            "notes.yaml".into(),
            workload(image, "notes", sink, "{on_claim: true, on_release: true}"),
        )]
    })
    .await
    else {
        return;
    };
    let first = c.claim("alice", "notes").await;
    assert!(
        fresh_with_data(first.source),
        "the restore ran (nothing saved yet) before Claim answered: {first:?}"
    );
    c.exec(
        &first.docker_id,
        "echo 'hello from alice' > /state/notes.txt && mkdir -p /state/deep/er && echo nested > /state/deep/er/file",
    )
    .await;

    // Release: the upload runs before the reservation begins, so the
    // files are in the sink when bh returns.
    c.bh_ok(&["release", "alice", "notes"]);
    assert_eq!(
        c.sink_file("alice", "notes.txt").as_deref(),
        Some("hello from alice\n")
    );
    assert_eq!(
        c.sink_file("alice", "deep/er/file").as_deref(),
        Some("nested\n")
    );

    // The reservation (2 s) expires and its container is destroyed.
    eventually(WAIT, "the reserved container to be destroyed", || async {
        (!c.docker_exists(&first.docker_id).await).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.server.log()));

    // A new container, with alice's files restored into it.
    let second = c.claim("alice", "notes").await;
    assert_ne!(second.container_id, first.container_id);
    assert!(fresh_with_data(second.source), "{second:?}");
    assert_eq!(
        c.exec(
            &second.docker_id,
            "cat /state/notes.txt /state/deep/er/file"
        )
        .await,
        "hello from alice\nnested\n"
    );
    // Another tenant gets none of them.
    let bob = c.claim("bob", "notes").await;
    assert_eq!(
        c.exec(&bob.docker_id, "ls -A /state").await,
        "",
        "a tenant only ever sees its own files"
    );

    let status = c.bh_ok(&["sync", "status", "--tenant", "alice"]);
    assert!(
        status.contains("alice") && status.contains(" ok "),
        "{status}"
    );
    let statuses = c.statuses("alice").await;
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert_eq!(statuses[0].state, pb::SyncState::Ok as i32);
    assert!(statuses[0].bytes_transferred >= 2 * 24, "{statuses:?}");
    assert!(statuses[0].last_sync_at.is_some());

    if grpcurl_available() {
        let out = c
            .server
            .grpcurl(&[
                "-d",
                r#"{"tenant_id":"alice"}"#,
                "boilerhouse.v1.SyncService/GetSyncStatus",
            ])
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).contains("SYNC_STATE_OK"), "{}", stdout(&out));
        let bad = c
            .server
            .grpcurl(&[
                "-d",
                r#"{"tenant_id":"no spaces allowed","workload_id":"notes"}"#,
                "boilerhouse.v1.SyncService/TriggerSync",
            ])
            .unwrap();
        assert!(stderr(&bad).contains("InvalidArgument"), "{}", stderr(&bad));
    }
}

#[tokio::test]
async fn periodic_syncs_upload_changes_and_catch_up_after_a_kill_9() {
    let Some(mut c) = Cluster::start(|image, sink| {
        vec![(
            "notes.yaml".into(),
            workload(
                image,
                "notes",
                sink,
                "{on_claim: true, on_release: true, interval: 3s}",
            ),
        )]
    })
    .await
    else {
        return;
    };
    let claim = c.claim("carol", "notes").await;
    c.exec(&claim.docker_id, "echo v1 > /state/a.txt").await;
    c.wait_sink("carol", "a.txt", "v1\n", "a periodic upload of v1")
        .await;
    let status = c.bh_ok(&["sync", "trigger", "carol", "notes"]);
    assert!(status.contains("carol"), "{status}");

    // Change the file and kill -9 the server before the next periodic
    // upload, then stay down until that upload is overdue.
    c.exec(&claim.docker_id, "echo v2 > /state/a.txt").await;
    let listen = c.server.addrs.grpc;
    c.server.kill();
    let down_at = Instant::now();
    eventually(WAIT, "the next periodic upload to be overdue", || async {
        (down_at.elapsed() > Duration::from_secs(4)).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(
        c.sink_file("carol", "a.txt").as_deref(),
        Some("v1\n"),
        "nothing uploads while the server is down"
    );
    c.start_server(listen).await;
    c.wait_sink("carol", "a.txt", "v2\n", "the catch-up upload of v2")
        .await;
    let events = c.events("sync.completed");
    assert!(events.contains("catch-up"), "{events}");
}

#[tokio::test]
async fn sigterm_runs_the_final_upload_and_drain_does_too() {
    let Some(mut c) = Cluster::start(|image, sink| {
        vec![(
            "notes.yaml".into(),
            // No periodic or release sync: only the final upload saves it.
            workload(image, "notes", sink, "{on_claim: true, on_release: false}"),
        )]
    })
    .await
    else {
        return;
    };
    let claim = c.claim("dave", "notes").await;
    c.exec(&claim.docker_id, "echo 'before shutdown' > /state/f.txt")
        .await;
    assert_eq!(c.sink_file("dave", "f.txt"), None);
    let listen = c.server.addrs.grpc;
    let status = c
        .server
        .signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}\n{}", c.server.log());
    assert_eq!(
        c.sink_file("dave", "f.txt").as_deref(),
        Some("before shutdown\n"),
        "{}",
        c.server.log()
    );
    assert!(
        c.docker_exists(&claim.docker_id).await,
        "shutdown never destroys containers"
    );

    // Back up; the tenant still has the same container. Drain the node:
    // its files are uploaded, the claim released, the containers removed.
    c.start_server(listen).await;
    c.wait_ready().await;
    let again = c.claim("dave", "notes").await;
    assert_eq!(again.container_id, claim.container_id);
    c.exec(&claim.docker_id, "echo 'before drain' > /state/f.txt")
        .await;
    let out = c.bh_ok(&["node", "drain", &c.node, "--deadline", "50s"]);
    assert!(out.contains("is drained"), "{out}");
    assert_eq!(
        c.sink_file("dave", "f.txt").as_deref(),
        Some("before drain\n")
    );
    assert!(!c.docker_exists(&claim.docker_id).await);
}

#[tokio::test]
async fn a_failed_release_upload_keeps_the_container_and_retries_until_it_succeeds() {
    let Some(c) = Cluster::start(|image, sink| {
        vec![(
            "notes.yaml".into(),
            workload(image, "notes", sink, "{on_claim: true, on_release: true}"),
        )]
    })
    .await
    else {
        return;
    };
    let claim = c.claim("erin", "notes").await;
    c.exec(&claim.docker_id, "echo precious > /state/p.txt")
        .await;
    // Break the sink: its directory becomes a file.
    std::fs::remove_dir_all(&c.sink).unwrap();
    std::fs::write(&c.sink, "not a directory").unwrap();
    c.bh_ok(&["release", "erin", "notes"]);

    // Retries fail and are recorded; the container outlives its 2 s
    // reservation meanwhile.
    let released = Instant::now();
    eventually(WAIT, "several failed retries", || async {
        let s = c.statuses("erin").await;
        (s.first()?.recent_errors.len() >= 3 && released.elapsed() > Duration::from_secs(3))
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.server.log()));
    assert!(
        c.docker_exists(&claim.docker_id).await,
        "kept while the upload is owed"
    );
    let statuses = c.statuses("erin").await;
    assert_eq!(
        statuses[0].state,
        pb::SyncState::Pending as i32,
        "{statuses:?}"
    );
    assert!(
        statuses[0].recent_errors[0].message.contains("sink"),
        "{statuses:?}"
    );
    let metrics = scrape_metrics(&c.server).await;
    assert!(
        metrics.contains("boilerhouse_sync_owed_uploads 1"),
        "{metrics}"
    );

    // The sink comes back: the next retry uploads, then the reservation
    // runs its course and the container goes.
    std::fs::remove_file(&c.sink).unwrap();
    std::fs::create_dir_all(&c.sink).unwrap();
    c.wait_sink("erin", "p.txt", "precious\n", "the retried upload")
        .await;
    eventually(
        WAIT,
        "the container to be destroyed after the upload",
        || async { (!c.docker_exists(&claim.docker_id).await).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", c.server.log()));
    assert!(c.events("sync.release_settled").contains("uploaded after"));
}

#[tokio::test]
async fn a_failed_restore_fails_the_claim_unless_the_workload_continues_without_data() {
    let Some(c) = Cluster::start(|image, sink| {
        vec![
            (
                "strict.yaml".into(),
                workload(image, "strict", sink, "{on_claim: true, on_release: true}"),
            ),
            (
                "lenient.yaml".into(),
                workload(
                    image,
                    "lenient",
                    sink,
                    "{on_claim: true, on_release: true, on_claim_error: continue}",
                ),
            ),
        ]
    })
    .await
    else {
        return;
    };
    // The tenant's manifest in the sink is damaged.
    let manifest = c.sink.join("tenants/frank/.boilerhouse-manifest.json");
    std::fs::create_dir_all(manifest.parent().unwrap()).unwrap();
    std::fs::write(&manifest, "{damaged").unwrap();

    let err = c.try_claim("frank", "strict").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("cannot restore frank's files"),
        "{err:?}"
    );
    assert!(
        c.bh_ok(&["claims", "list"])
            .lines()
            .all(|l| !l.contains("frank"))
    );

    let lenient = c.claim("frank", "lenient").await;
    assert!(
        [pb::ClaimSource::Pool as i32, pb::ClaimSource::Cold as i32].contains(&lenient.source),
        "claimed, but without the data: {lenient:?}"
    );

    // Repaired, a retry of the strict claim gets the kept container back
    // and restores into it.
    std::fs::remove_file(&manifest).unwrap();
    let retry = c.claim("frank", "strict").await;
    assert_eq!(retry.source, pb::ClaimSource::AffinityWithData as i32);
}

/// A new container (warm or cold) with the tenant's files restored.
fn fresh_with_data(source: i32) -> bool {
    [
        pb::ClaimSource::PoolWithData as i32,
        pb::ClaimSource::ColdWithData as i32,
    ]
    .contains(&source)
}

async fn scrape_metrics(server: &ServerProcess) -> String {
    let addr = server.addrs.metrics;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}
