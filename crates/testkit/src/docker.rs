//! The real Docker engine in tests: whether it is there, the test image
//! built without any registry, and the per-run label that scopes what tests
//! create and remove.
//!
//! The test image is a rootfs holding a static busybox (Debian's
//! `busybox-static`), imported through the engine's image-import API
//! (`POST /images/create?fromSrc=-`). It is tagged and labelled with the
//! test run's id, so cleanup removes exactly what this run made.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use bollard::Docker;
use bollard::query_parameters::{
    CreateImageOptions, ListContainersOptions, RemoveContainerOptions,
};
use futures::StreamExt as _;

/// The label every test container and image carries.
pub const TEST_RUN_LABEL: &str = "boilerhouse.test-run";

/// This run's id: `BOILERHOUSE_TEST_RUN` (set by dev/test), else `local`.
pub fn test_run_id() -> String {
    std::env::var("BOILERHOUSE_TEST_RUN")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "local".to_owned())
}

/// The busybox applets linked into the test image.
const APPLETS: &[&str] = &[
    "sh", "ash", "sleep", "true", "false", "test", "[", "cat", "ls", "echo", "touch", "mkdir",
    "rm", "id", "env", "ps", "kill", "date", "printf", "sync", "mv", "cp", "wc", "head", "tail",
    "grep", "sed", "dd", "du", "stat", "chmod", "ln", "find", "xargs", "tee", "yes", "uname",
    "hostname", "whoami", "nproc",
];

/// Connects to the local engine. Without one, tests skip with a loud
/// message, unless `BOILERHOUSE_REQUIRE_DOCKER=1` (CI), where they fail.
pub async fn require_docker() -> Option<Docker> {
    let attempt = async {
        let docker = Docker::connect_with_local_defaults()?;
        let docker = docker.negotiate_version().await?;
        docker.ping().await?;
        Ok::<_, bollard::errors::Error>(docker)
    };
    match attempt.await {
        Ok(docker) => Some(docker),
        Err(e) => {
            if std::env::var("BOILERHOUSE_REQUIRE_DOCKER").as_deref() == Ok("1") {
                panic!("BOILERHOUSE_REQUIRE_DOCKER=1 but the Docker engine is unreachable: {e}");
            }
            eprintln!(
                "\n*** SKIPPING: no Docker engine ({e}); set BOILERHOUSE_REQUIRE_DOCKER=1 to make this a failure ***\n"
            );
            None
        }
    }
}

fn busybox_path() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("BOILERHOUSE_BUSYBOX") {
        return Ok(PathBuf::from(p));
    }
    for candidate in ["/bin/busybox", "/usr/bin/busybox"] {
        let path = Path::new(candidate);
        if path.exists() {
            return Ok(path.to_owned());
        }
    }
    anyhow::bail!(
        "no static busybox found: apt-get install busybox-static (or set BOILERHOUSE_BUSYBOX)"
    )
}

/// A rootfs tarball: busybox, its applets as symlinks, and the few files a
/// non-root process expects.
pub fn rootfs_tar() -> anyhow::Result<Vec<u8>> {
    let busybox = std::fs::read(busybox_path()?).context("reading busybox")?;
    let mut builder = tar::Builder::new(Vec::new());
    let mut dir = |path: &str, mode: u32| -> anyhow::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(mode);
        header.set_size(0);
        header.set_mtime(0);
        builder.append_data(&mut header, path, std::io::empty())?;
        Ok(())
    };
    for (path, mode) in [
        ("bin", 0o755),
        ("etc", 0o755),
        ("tmp", 0o1777),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("home", 0o755),
        ("root", 0o700),
    ] {
        dir(path, mode)?;
    }
    let mut file = |path: &str, mode: u32, data: &[u8]| -> anyhow::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(mode);
        header.set_size(data.len() as u64);
        header.set_mtime(0);
        builder.append_data(&mut header, path, data)?;
        Ok(())
    };
    file("bin/busybox", 0o755, &busybox)?;
    file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
    )?;
    file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")?;
    for applet in APPLETS {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_mode(0o777);
        header.set_size(0);
        header.set_mtime(0);
        builder.append_link(&mut header, format!("bin/{applet}"), "busybox")?;
    }
    Ok(builder.into_inner()?)
}

/// Imports the rootfs as `repo:tag` with `changes` (Dockerfile
/// instructions such as `CMD` or `LABEL`), unless that image exists.
pub async fn import_image(
    docker: &Docker,
    repo: &str,
    tag: &str,
    changes: Vec<String>,
) -> anyhow::Result<String> {
    let reference = format!("{repo}:{tag}");
    if docker.inspect_image(&reference).await.is_ok() {
        return Ok(reference);
    }
    let tar = rootfs_tar()?;
    let options = CreateImageOptions {
        from_src: Some("-".to_owned()),
        repo: Some(repo.to_owned()),
        tag: Some(tag.to_owned()),
        changes,
        ..Default::default()
    };
    let mut progress =
        docker.create_image(Some(options), Some(bollard::body_full(tar.into())), None);
    while let Some(item) = progress.next().await {
        item.with_context(|| format!("importing {reference}"))?;
    }
    docker
        .inspect_image(&reference)
        .await
        .with_context(|| format!("{reference} missing after import"))?;
    Ok(reference)
}

/// The test image for this run, built on first use.
pub async fn test_image(docker: &Docker) -> anyhow::Result<String> {
    let run = test_run_id();
    import_image(
        docker,
        "boilerhouse-test/busybox",
        &run,
        vec![
            format!("LABEL {TEST_RUN_LABEL}={run}"),
            r#"CMD ["sleep", "2147483647"]"#.to_owned(),
        ],
    )
    .await
}

/// A node name unique to this test, so tests running side by side on one
/// engine never see each other's containers.
pub fn unique_node(prefix: &str) -> String {
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}-{}", &suffix[suffix.len() - 8..])
}

/// Containers of this test run carrying `label=value`.
pub async fn containers_with(
    docker: &Docker,
    label: &str,
    value: &str,
) -> anyhow::Result<Vec<bollard::models::ContainerSummary>> {
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![
            format!("{label}={value}"),
            format!("{TEST_RUN_LABEL}={}", test_run_id()),
        ],
    )]);
    Ok(docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await?)
}

/// Removes this run's containers of `node` (by the node label).
pub async fn remove_node_containers(docker: &Docker, node: &str) {
    if let Ok(containers) = containers_with(docker, "boilerhouse.node-id", node).await {
        for c in containers {
            if let Some(id) = c.id {
                let _ = docker
                    .remove_container(
                        &id,
                        Some(RemoveContainerOptions {
                            force: true,
                            v: true,
                            link: false,
                        }),
                    )
                    .await;
            }
        }
    }
}

/// Removes this run's containers of every node in `nodes`, blocking: for
/// `Drop` impls, which cannot await (it runs on a thread of its own, so it
/// works inside or outside a runtime).
pub fn remove_node_containers_blocking(docker: &Docker, nodes: &[String]) {
    let docker = docker.clone();
    let nodes = nodes.to_vec();
    std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Runtime::new() else {
            return;
        };
        runtime.block_on(async {
            for node in &nodes {
                remove_node_containers(&docker, node).await;
            }
        });
    })
    .join()
    .ok();
}

/// Runs a shell script in a container and returns its output once it has
/// finished.
pub async fn exec(docker: &Docker, docker_id: &str, script: &str) -> anyhow::Result<String> {
    let exec = docker
        .create_exec(
            docker_id,
            bollard::models::ExecConfig {
                cmd: Some(vec!["sh".into(), "-c".into(), script.into()]),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await?;
    let mut text = String::new();
    if let bollard::exec::StartExecResults::Attached { mut output, .. } =
        docker.start_exec(&exec.id, None).await?
    {
        while let Some(chunk) = output.next().await {
            text.push_str(&chunk?.to_string());
        }
    }
    Ok(text)
}

/// Writes `contents` to a temp file and returns its path (kept alive by the
/// returned guard).
pub fn temp_file(contents: &str) -> anyhow::Result<tempfile::NamedTempFile> {
    let mut f = tempfile::NamedTempFile::new()?;
    f.write_all(contents.as_bytes())?;
    Ok(f)
}

/// The spec of a managed container of workload `workload_id` on `node`,
/// built the way the server builds one and labelled with this test run:
/// for tests that put a container in place behind the server's back.
pub fn managed_spec(
    image: &str,
    node: &str,
    workload_id: &str,
    created_at: boilerhouse_core::Timestamp,
) -> boilerhouse_core::container::ContainerSpec {
    let workload = boilerhouse_core::workload::parse_workload(
        "test.yaml",
        &format!("id: {workload_id}\nimage: {image}\ncommand: [sleep, infinity]\n"),
    )
    .expect("a valid test workload");
    let mut spec = boilerhouse_core::container::ContainerSpec::for_workload(
        &workload,
        boilerhouse_core::ContainerId::from_uuid(uuid::Uuid::now_v7()),
        &boilerhouse_core::NodeId::new(node).expect("a valid node name"),
        created_at,
    );
    spec.labels.insert(TEST_RUN_LABEL.into(), test_run_id());
    spec
}
