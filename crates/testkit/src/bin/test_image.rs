//! boilerhouse-test-image: imports the busybox rootfs as a local image,
//! with no registry. `dev/run` uses it for the example workloads' image.
//!
//! boilerhouse-test-image [repo:tag]   (default boilerhouse/busybox:latest)

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let reference = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "boilerhouse/busybox:latest".to_owned());
    let (repo, tag) = reference
        .rsplit_once(':')
        .unwrap_or((reference.as_str(), "latest"));
    let docker = bollard::Docker::connect_with_local_defaults()?
        .negotiate_version()
        .await?;
    let image = boilerhouse_testkit::docker::import_image(
        &docker,
        repo,
        tag,
        vec![r#"CMD ["sleep", "2147483647"]"#.to_owned()],
    )
    .await?;
    println!("{image}");
    Ok(())
}
