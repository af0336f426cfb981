//! Tenant state sync against the real Docker engine with a local sink,
//! driven as a new user would: files written with `docker exec`, `bh`
//! for release and status, kill -9 and SIGTERM of the server.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tonic::Code;

use boilerhouse_proto::pb;
use boilerhouse_testkit::cluster::Cluster;
use boilerhouse_testkit::{grpcurl_available, stderr, stdout};

const CONFIG: &str = r#"final_sync_deadline = "20s""#;

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

/// A server and one agent, serving one syncing workload per (id, policy).
async fn start(workloads: &[(&'static str, &'static str)]) -> Option<Cluster> {
    let mut builder = Cluster::builder().node("sync").config(CONFIG);
    let sink = builder.dir().join("sink");
    for &(id, policy) in workloads {
        let sink = sink.clone();
        builder = builder.workload(id, move |image| workload(image, id, &sink, policy));
    }
    builder.start().await
}

/// Where the workloads sync to.
fn sink(c: &Cluster) -> PathBuf {
    c.dir().join("sink")
}

fn sink_file(c: &Cluster, tenant: &str, path: &str) -> Option<String> {
    std::fs::read_to_string(sink(c).join("tenants").join(tenant).join(path)).ok()
}

async fn wait_sink(c: &Cluster, tenant: &str, path: &str, want: &str, what: &str) {
    boilerhouse_testkit::eventually(c.timeout(), what, || async {
        (sink_file(c, tenant, path).as_deref() == Some(want)).then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: sink has {:?}\n{}",
            sink_file(c, tenant, path),
            c.server().log()
        )
    });
}

async fn sync_statuses(c: &Cluster, tenant: &str) -> Vec<pb::SyncStatus> {
    c.syncs()
        .await
        .get_sync_status(pb::GetSyncStatusRequest {
            tenant_id: tenant.into(),
            workload_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .statuses
}

fn events_of_kind(c: &Cluster, kind: &str) -> String {
    c.bh_ok(&["events", "--kind", kind])
}

#[tokio::test]
async fn files_follow_the_tenant_to_a_new_container_after_the_reservation_expires() {
    let Some(c) = start(&[("notes", "{on_claim: true, on_release: true}")]).await else {
        return;
    };
    let first = c.claim("alice", "notes").await;
    assert!(
        [pb::ClaimSource::Pool as i32, pb::ClaimSource::Cold as i32].contains(&first.source),
        "nothing saved yet, so nothing restored: not WITH_DATA ({first:?})"
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
        sink_file(&c, "alice", "notes.txt").as_deref(),
        Some("hello from alice\n")
    );
    assert_eq!(
        sink_file(&c, "alice", "deep/er/file").as_deref(),
        Some("nested\n")
    );

    // The reservation (2 s) expires and its container is destroyed.
    c.eventually("the reserved container to be destroyed", || async {
        (!c.exists(&first.docker_id).await).then_some(())
    })
    .await;

    // A new container, with alice's files restored into it.
    let second = c.claim("alice", "notes").await;
    assert_ne!(second.container_id, first.container_id);
    assert!(fresh_with_data(second.source), "{second:?}");
    // Every view of the claim agrees with the answer.
    let got = c
        .claims()
        .await
        .get_claim(pb::GetClaimRequest {
            tenant_id: "alice".into(),
            workload_id: "notes".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .claim
        .unwrap();
    assert_eq!(got.source, second.source, "{got:?}");
    let listed = c.bh_ok(&["claims", "list"]);
    assert!(
        listed
            .lines()
            .any(|l| l.contains("alice") && l.contains("_WITH_DATA")),
        "{listed}"
    );
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
    let statuses = sync_statuses(&c, "alice").await;
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert_eq!(statuses[0].state, pb::SyncState::Ok as i32);
    assert!(statuses[0].bytes_transferred >= 2 * 24, "{statuses:?}");
    assert!(statuses[0].last_sync_at.is_some());

    if grpcurl_available() {
        let out = c.grpcurl(&[
            "-d",
            r#"{"tenant_id":"alice"}"#,
            "boilerhouse.v1.SyncService/GetSyncStatus",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).contains("SYNC_STATE_OK"), "{}", stdout(&out));
        let bad = c.grpcurl(&[
            "-d",
            r#"{"tenant_id":"no spaces allowed","workload_id":"notes"}"#,
            "boilerhouse.v1.SyncService/TriggerSync",
        ]);
        assert!(stderr(&bad).contains("InvalidArgument"), "{}", stderr(&bad));
    }
}

#[tokio::test]
async fn periodic_syncs_upload_changes_and_catch_up_after_a_kill_9() {
    let Some(mut c) = start(&[(
        "notes",
        "{on_claim: true, on_release: true, interval: 3s, manual: true}",
    )])
    .await
    else {
        return;
    };
    let claim = c.claim("carol", "notes").await;
    c.exec(&claim.docker_id, "echo v1 > /state/a.txt").await;
    wait_sink(&c, "carol", "a.txt", "v1\n", "a periodic upload of v1").await;
    let status = c.bh_ok(&["sync", "trigger", "carol", "notes"]);
    assert!(status.contains("carol"), "{status}");

    // Change the file and kill -9 the server before the next periodic
    // upload, then stay down until that upload is overdue.
    c.exec(&claim.docker_id, "echo v2 > /state/a.txt").await;
    c.kill_server();
    let down_at = Instant::now();
    c.eventually("the next periodic upload to be overdue", || async {
        (down_at.elapsed() > Duration::from_secs(4)).then_some(())
    })
    .await;
    assert_eq!(
        sink_file(&c, "carol", "a.txt").as_deref(),
        Some("v1\n"),
        "nothing uploads while the server is down"
    );
    c.start_server().await;
    wait_sink(&c, "carol", "a.txt", "v2\n", "the catch-up upload of v2").await;
    let events = events_of_kind(&c, "sync.completed");
    assert!(events.contains("catch-up"), "{events}");
}

#[tokio::test]
async fn sigterm_runs_the_final_upload_and_drain_does_too() {
    // No periodic or release sync: only the final upload saves it.
    let Some(mut c) = start(&[("notes", "{on_claim: true, on_release: false}")]).await else {
        return;
    };
    let claim = c.claim("dave", "notes").await;
    c.exec(&claim.docker_id, "echo 'before shutdown' > /state/f.txt")
        .await;
    assert_eq!(sink_file(&c, "dave", "f.txt"), None);
    let status = c.stop_server().await;
    assert!(status.success(), "{status:?}\n{}", c.server().log());
    assert_eq!(
        sink_file(&c, "dave", "f.txt").as_deref(),
        Some("before shutdown\n"),
        "{}",
        c.server().log()
    );
    assert!(
        c.exists(&claim.docker_id).await,
        "shutdown never destroys containers"
    );

    // Back up; the tenant still has the same container. Drain the node:
    // its files are uploaded, the claim released, the containers removed.
    c.start_server().await;
    c.wait_ready().await;
    let again = c.claim("dave", "notes").await;
    assert_eq!(again.container_id, claim.container_id);
    c.exec(&claim.docker_id, "echo 'before drain' > /state/f.txt")
        .await;
    let out = c.bh_ok(&["node", "drain", c.node(0), "--deadline", "50s"]);
    assert!(out.contains("is drained"), "{out}");
    assert_eq!(
        sink_file(&c, "dave", "f.txt").as_deref(),
        Some("before drain\n")
    );
    assert!(!c.exists(&claim.docker_id).await);
}

#[tokio::test]
async fn a_failed_release_upload_keeps_the_container_and_retries_until_it_succeeds() {
    let Some(c) = start(&[("notes", "{on_claim: true, on_release: true}")]).await else {
        return;
    };
    let claim = c.claim("erin", "notes").await;
    c.exec(&claim.docker_id, "echo precious > /state/p.txt")
        .await;
    // Break the sink: its directory becomes a file.
    std::fs::remove_dir_all(sink(&c)).unwrap();
    std::fs::write(sink(&c), "not a directory").unwrap();
    c.bh_ok(&["release", "erin", "notes"]);

    // Retries fail and are recorded; the container outlives its 2 s
    // reservation meanwhile.
    let released = Instant::now();
    c.eventually("several failed retries", || async {
        let s = sync_statuses(&c, "erin").await;
        (s.first()?.recent_errors.len() >= 3 && released.elapsed() > Duration::from_secs(3))
            .then_some(())
    })
    .await;
    assert!(
        c.exists(&claim.docker_id).await,
        "kept while the upload is owed"
    );
    let statuses = sync_statuses(&c, "erin").await;
    assert_eq!(
        statuses[0].state,
        pb::SyncState::Pending as i32,
        "{statuses:?}"
    );
    assert!(
        statuses[0].recent_errors[0].message.contains("sink"),
        "{statuses:?}"
    );
    let metrics = c.metrics().await;
    assert!(
        metrics.contains("boilerhouse_sync_owed_uploads 1"),
        "{metrics}"
    );
    // The reservation is past its expiry and says why it is still there.
    let listed = c.bh_ok(&["affinity", "list"]);
    assert!(
        listed
            .lines()
            .any(|l| l.contains("erin") && l.contains("held") && l.contains("upload")),
        "{listed}"
    );

    // The sink comes back: the next retry uploads, then the reservation
    // runs its course and the container goes.
    std::fs::remove_file(sink(&c)).unwrap();
    std::fs::create_dir_all(sink(&c)).unwrap();
    wait_sink(&c, "erin", "p.txt", "precious\n", "the retried upload").await;
    c.eventually("the container to be destroyed after the upload", || async {
        (!c.exists(&claim.docker_id).await).then_some(())
    })
    .await;
    assert!(events_of_kind(&c, "sync.release_settled").contains("uploaded after"));
}

#[tokio::test]
async fn a_failed_restore_fails_the_claim_unless_the_workload_continues_without_data() {
    let Some(c) = start(&[
        ("strict", "{on_claim: true, on_release: true}"),
        (
            "lenient",
            "{on_claim: true, on_release: true, on_claim_error: continue}",
        ),
    ])
    .await
    else {
        return;
    };
    // The tenant's manifest in the sink is damaged.
    let manifest = sink(&c).join("tenants/frank/.boilerhouse-manifest.json");
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

    // Repaired (frank has nothing saved after all), a retry of the strict
    // claim gets the kept container back; nothing to restore, so not
    // WITH_DATA.
    std::fs::remove_file(&manifest).unwrap();
    let retry = c.claim("frank", "strict").await;
    assert_eq!(retry.source, pb::ClaimSource::Affinity as i32);

    // A sink that lost an object its manifest lists: the claim restores
    // what exists and says what is missing, instead of locking the tenant
    // out; the manifest is repaired.
    let kept = c.claim("grace", "strict").await;
    c.exec(
        &kept.docker_id,
        "echo a > /state/a.txt && echo b > /state/b.txt",
    )
    .await;
    c.bh_ok(&["release", "grace", "strict"]);
    std::fs::remove_file(sink(&c).join("tenants/grace/b.txt")).unwrap();
    c.eventually("grace's reservation to expire", || async {
        (!c.exists(&kept.docker_id).await).then_some(())
    })
    .await;
    let answer = c
        .claims()
        .await
        .claim(pb::ClaimRequest {
            tenant_id: "grace".into(),
            workload_id: "strict".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let claim = answer.claim.unwrap();
    assert!(fresh_with_data(claim.source), "{claim:?}");
    assert!(
        answer.restore_warning.contains("b.txt") && answer.restore_warning.contains("missing"),
        "{:?}",
        answer.restore_warning
    );
    assert_eq!(c.exec(&claim.docker_id, "cat /state/a.txt").await, "a\n");
    let statuses = sync_statuses(&c, "grace").await;
    assert_eq!(
        statuses[0].state,
        pb::SyncState::Warning as i32,
        "{statuses:?}"
    );
}

/// A new container (warm or cold) with the tenant's files restored.
fn fresh_with_data(source: i32) -> bool {
    [
        pb::ClaimSource::PoolWithData as i32,
        pb::ClaimSource::ColdWithData as i32,
    ]
    .contains(&source)
}
