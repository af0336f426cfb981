//! Tenant state sync you can trust, against the real Docker engine, tried
//! as a new user would: a workload file in the original Boilerhouse format
//! (container paths, patterns, sink paths, manual triggers), a tenant that
//! plants symlinks to host directories, a mapping of a directory that does
//! not exist, and a release whose upload is taken of a paused container.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::query_parameters::EventsOptions;
use futures::StreamExt as _;

use boilerhouse_proto::pb;
use boilerhouse_testkit::cluster::Cluster;

/// A workload as the original Boilerhouse wrote them: the state volume at
/// `/data`, mappings named by their path inside the container.
fn original_format(image: &str, sink: &Path) -> String {
    format!(
        r#"id: notebook
name: Notebook
image: {image}
command: [sleep, infinity]
volumes:
  state:
    target: /data
pool:
  min_size: 1
  max_size: 4
  affinity_timeout: 2s
sync:
  sink:
    type: local
    path: {sink}
    prefix: tenants/${{tenantId}}/
  mappings:
    - path: /data
      pattern: "**/*.ipynb"
      sink_path: nb
      direction: bidirectional
      mode: sync
    - path: /data/results
      direction: upload
      mode: copy
    - path: /data/never-made
      direction: upload
  policy:
    on_claim: true
    on_release: true
    manual: true
"#,
        sink = sink.display()
    )
}

/// The whole state directory, synced both ways; manual syncs allowed or
/// not.
fn whole_state(image: &str, id: &str, sink: &Path, manual: bool) -> String {
    format!(
        "id: {id}\nimage: {image}\ncommand: [sleep, infinity]\n\
         volumes: {{state: {{target: /state}}}}\n\
         pool: {{min_size: 1, max_size: 4, affinity_timeout: 1h}}\n\
         sync:\n  sink: {{type: local, path: {}, prefix: \"tenants/${{tenantId}}\"}}\n\
         \x20 mappings: [{{path: /state, direction: bidirectional}}, {{path: /state/mapped, direction: bidirectional}}]\n\
         \x20 policy: {{on_claim: true, on_release: true, manual: {manual}}}\n",
        sink.display()
    )
}

fn sink_dir(c: &Cluster) -> PathBuf {
    c.dir().join("sink")
}

fn in_sink(c: &Cluster, tenant: &str, key: &str) -> Option<String> {
    std::fs::read_to_string(sink_dir(c).join("tenants").join(tenant).join(key)).ok()
}

async fn statuses(c: &Cluster, tenant: &str) -> HashMap<String, pb::SyncStatus> {
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
        .into_iter()
        .map(|s| (s.sync_id.clone(), s))
        .collect()
}

/// The engine's events for one container between two times (seconds).
async fn engine_actions(c: &Cluster, docker_id: &str, since: i64, until: i64) -> Vec<String> {
    let filters = HashMap::from([("container".to_owned(), vec![docker_id.to_owned()])]);
    c.docker()
        .events(Some(EventsOptions {
            since: Some(since.to_string()),
            until: Some(until.to_string()),
            filters: Some(filters),
        }))
        .filter_map(|e| async move { e.ok()?.action })
        .collect()
        .await
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn an_original_format_workload_saves_what_matches_restores_it_and_warns_about_the_rest() {
    let mut builder = Cluster::builder().node("orig");
    let sink = builder.dir().join("sink");
    builder = builder.workload("notebook", move |image| original_format(image, &sink));
    let Some(c) = builder.start().await else {
        return;
    };
    let first = c.claim("alice", "notebook").await;
    c.exec(
        &first.docker_id,
        "mkdir -p /data/sub /data/results && echo one > /data/a.ipynb && echo two > /data/sub/b.ipynb \
         && echo scratch > /data/scratch.txt && echo 42 > /data/results/r.csv",
    )
    .await;

    let before_release = unix_now();
    c.bh_ok(&["release", "alice", "notebook"]);
    let after_release = unix_now() + 1;

    // Only matching files, under the sink path; the upload-only mapping
    // under its own directory; nothing else.
    assert_eq!(in_sink(&c, "alice", "nb/a.ipynb").as_deref(), Some("one\n"));
    assert_eq!(
        in_sink(&c, "alice", "nb/sub/b.ipynb").as_deref(),
        Some("two\n")
    );
    assert_eq!(
        in_sink(&c, "alice", "results/r.csv").as_deref(),
        Some("42\n")
    );
    assert_eq!(in_sink(&c, "alice", "nb/scratch.txt"), None);
    assert_eq!(in_sink(&c, "alice", "scratch.txt"), None);

    // The upload was taken of a paused container.
    let actions = engine_actions(&c, &first.docker_id, before_release, after_release).await;
    let pause = actions.iter().position(|a| a == "pause");
    let unpause = actions.iter().position(|a| a == "unpause");
    assert!(
        matches!((pause, unpause), (Some(p), Some(u)) if p < u),
        "pause, then unpause, around the release's upload: {actions:?}"
    );

    // The mapping of a directory that does not exist is a warning, with
    // its reason, in the status, in bh and in the events; never "ok".
    let s = statuses(&c, "alice").await;
    let missing = &s["/data/never-made"];
    assert_eq!(missing.state, pb::SyncState::Warning as i32, "{s:?}");
    assert!(missing.warning.contains("does not exist"), "{missing:?}");
    assert_eq!(
        s["/data:**/*.ipynb"].state,
        pb::SyncState::Ok as i32,
        "{s:?}"
    );
    let table = c.bh_ok(&["sync", "status", "--tenant", "alice"]);
    assert!(
        table.lines().any(|l| l.contains("/data/never-made")
            && l.contains("warning")
            && l.contains("does not exist")),
        "{table}"
    );
    let events = c.bh_ok(&["events", "--kind", "sync.warning"]);
    assert!(
        events.contains("/data/never-made") && events.contains("does not exist"),
        "{events}"
    );

    // The reservation expires; a new container gets the matching files
    // back, and not what the pattern left behind.
    c.eventually("the reserved container to be destroyed", || async {
        (!c.exists(&first.docker_id).await).then_some(())
    })
    .await;
    let second = c.claim("alice", "notebook").await;
    assert_ne!(second.container_id, first.container_id);
    assert_eq!(
        c.exec(&second.docker_id, "cat /data/a.ipynb /data/sub/b.ipynb")
            .await,
        "one\ntwo\n"
    );
    assert_eq!(
        c.exec(
            &second.docker_id,
            "ls /data/scratch.txt /data/results 2>&1 || true"
        )
        .await
        .matches("No such file")
        .count(),
        2,
        "unmatched and upload-only files are not restored"
    );

    // policy.manual: true lets an operator sync by hand.
    let out = c.bh_ok(&["sync", "trigger", "alice", "notebook"]);
    assert!(out.contains("alice"), "{out}");
}

#[tokio::test]
async fn a_tenant_cannot_reach_host_files_through_symlinks_in_its_state_directory() {
    let mut builder = Cluster::builder().node("links");
    let (dir, sink) = (builder.dir().to_path_buf(), builder.dir().join("sink"));
    let sink2 = sink.clone();
    builder = builder
        .workload("box", move |image| whole_state(image, "box", &sink, true))
        .workload("locked", move |image| {
            whole_state(image, "locked", &sink2, false)
        });
    let Some(c) = builder.start().await else {
        return;
    };
    // Host directories the tenant knows the paths of.
    let secret = dir.join("host-secret");
    let victim = dir.join("host-victim");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(secret.join("key"), "host secret\n").unwrap();

    let claim = c.claim("mallory", "box").await;
    c.exec(
        &claim.docker_id,
        &format!(
            "mkdir -p /state/keep /state/deep && echo mine > /state/keep/f \
             && ln -s {secret} /state/mapped && ln -s {secret} /state/deep/down \
             && ln -s {secret}/key /state/key-link",
            secret = secret.display()
        ),
    )
    .await;
    c.bh_ok(&["release", "mallory", "box"]);

    // The tenant's own file is saved; nothing of the host directory is,
    // whether the symlink is the mapping itself or lies below it.
    assert_eq!(in_sink(&c, "mallory", "keep/f").as_deref(), Some("mine\n"));
    for leaked in ["mapped/key", "deep/down/key", "key-link"] {
        assert_eq!(in_sink(&c, "mallory", leaked), None, "{leaked} leaked");
    }
    let all: Vec<String> = walkdir(&sink_dir(&c));
    assert!(
        all.iter().all(|p| !std::fs::read_to_string(p)
            .unwrap_or_default()
            .contains("host secret")),
        "{all:?}"
    );
    // And the attempt is reported: the mapping through a symlink saved
    // nothing, the links below were left alone, by name. The release
    // completed (no upload is owed for files that are not there to save).
    let s = statuses(&c, "mallory").await;
    let mapped = &s["/state/mapped"];
    assert_eq!(mapped.state, pb::SyncState::Warning as i32, "{s:?}");
    assert!(mapped.warning.contains("symlink"), "{mapped:?}");
    let events = c.bh_ok(&["events", "--kind", "sync.warning"]);
    assert!(
        events.contains("/state/mapped") && events.contains("symlink"),
        "{events}"
    );
    let whole = &s["/state"];
    assert_eq!(whole.state, pb::SyncState::Warning as i32, "{s:?}");
    assert!(
        whole.warning.contains("deep/down") && whole.warning.contains("key-link"),
        "{whole:?}"
    );

    // Writes: the tenant swaps its saved directory for a symlink to a
    // host directory and asks for its files back. Nothing is written
    // there.
    let claim = c.claim("mallory", "box").await;
    c.exec(
        &claim.docker_id,
        &format!(
            "rm -rf /state/keep && ln -s {} /state/keep",
            victim.display()
        ),
    )
    .await;
    let syncs = c.syncs().await;
    let _ = syncs
        .clone()
        .trigger_sync(pb::TriggerSyncRequest {
            tenant_id: "mallory".into(),
            workload_id: "box".into(),
            direction: pb::SyncDirection::Download as i32,
            request_id: String::new(),
        })
        .await;
    assert_eq!(
        std::fs::read_dir(&victim).unwrap().count(),
        0,
        "nothing written outside the state directory"
    );
    let s = statuses(&c, "mallory").await;
    assert!(
        s["/state"]
            .recent_errors
            .iter()
            .any(|e| e.message.contains("keep") && e.message.contains("symlink")),
        "{:?}",
        s["/state"]
    );

    // Without policy.manual, a manual sync is refused with the reason.
    c.claim("trent", "locked").await;
    let err = syncs
        .clone()
        .trigger_sync(pb::TriggerSyncRequest {
            tenant_id: "trent".into(),
            workload_id: "locked".into(),
            direction: pb::SyncDirection::Unspecified as i32,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("sync.policy.manual"), "{err:?}");
    let out = c.bh_err(&["sync", "trigger", "trent", "locked"]);
    assert!(out.contains("manual"), "{out}");
}

/// Every file under `dir`, not following symlinks.
fn walkdir(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let t = entry.file_type().unwrap();
            if t.is_dir() {
                stack.push(entry.path());
            } else if t.is_file() {
                out.push(entry.path().display().to_string());
            }
        }
    }
    out
}
