//! boilerhouse-test-image: the registry-free image, and test cleanup.
//!
//! boilerhouse-test-image [repo:tag]    import the busybox rootfs as an image
//!                                      (default boilerhouse/busybox:latest)
//! boilerhouse-test-image clean <run>   remove the containers and images
//!                                      labelled boilerhouse.test-run=<run>,
//!                                      and the run's test networks
//!                                      (network namespaces, client legs)
//!                                      and, with BOILERHOUSE_POSTGRES_URL,
//!                                      its PostgreSQL schemas

use std::collections::HashMap;

use bollard::query_parameters::{
    ListContainersOptions, ListImagesOptions, RemoveContainerOptions, RemoveImageOptions,
};

use boilerhouse_testkit::docker::TEST_RUN_LABEL;

async fn clean(docker: &bollard::Docker, run: &str) -> anyhow::Result<()> {
    let filters = HashMap::from([("label".to_owned(), vec![format!("{TEST_RUN_LABEL}={run}")])]);
    let containers = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters.clone()),
            ..Default::default()
        }))
        .await?;
    for c in &containers {
        if let Some(id) = &c.id {
            docker
                .remove_container(
                    id,
                    Some(RemoveContainerOptions {
                        force: true,
                        v: true,
                        link: false,
                    }),
                )
                .await?;
        }
    }
    let images = docker
        .list_images(Some(ListImagesOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await?;
    for image in &images {
        docker
            .remove_image(
                &image.id,
                Some(RemoveImageOptions {
                    force: true,
                    noprune: false,
                    platforms: None,
                }),
                None,
            )
            .await?;
    }
    println!(
        "removed {} containers and {} images of test run {run}",
        containers.len(),
        images.len()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("clean")
        && let Some(run) = args.get(1)
    {
        // Before Docker: a machine without an engine can still have them.
        let removed = boilerhouse_testkit::netns::clean_run(run);
        println!("removed {removed} network namespaces and links of test run {run}");
        if let Ok(admin) = std::env::var("BOILERHOUSE_POSTGRES_URL") {
            match boilerhouse_testkit::database::drop_run_schemas(&admin, run).await {
                Ok(n) => println!("removed {n} PostgreSQL schemas of test run {run}"),
                Err(e) => eprintln!("cannot drop the PostgreSQL schemas of test run {run}: {e}"),
            }
        }
    }
    let docker = bollard::Docker::connect_with_local_defaults()?
        .negotiate_version()
        .await?;
    if args.first().map(String::as_str) == Some("clean") {
        let run = args
            .get(1)
            .ok_or_else(|| anyhow::anyhow!("usage: boilerhouse-test-image clean <run>"))?;
        return clean(&docker, run).await;
    }
    let reference = args
        .first()
        .cloned()
        .unwrap_or_else(|| "boilerhouse/busybox:latest".to_owned());
    let (repo, tag) = reference
        .rsplit_once(':')
        .unwrap_or((reference.as_str(), "latest"));
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
