//! Workload admission against the real server and the real Docker engine:
//! the issue's workload (root, host network, Docker's default
//! capabilities, setuid escalation, no process limit) is refused through
//! the workload directory and through ApplyWorkload, naming each field and
//! the policy key; a per-workload allowance admits exactly that workload;
//! a local sink outside the allowed roots is refused.

use tonic::Code;
use tonic_types::StatusExt as _;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::workload_service_client::WorkloadServiceClient;
use boilerhouse_testkit::cluster::Cluster;

/// The workload of the issue, under the id `id`.
fn risky(image: &str, id: &str) -> String {
    format!(
        "id: {id}\nimage: {image}\ncommand: [sleep, infinity]\n\
         user: \"0:0\"\nnetwork_mode: host\n\
         security: {{non_root: false, cap_drop: [], no_new_privileges: false, pids_limit: 0}}\n\
         pool: {{min_size: 1, max_size: 1}}\n"
    )
}

/// A hardened workload syncing to a local sink at `sink`.
fn syncing(image: &str, id: &str, sink: &str) -> String {
    format!(
        "id: {id}\nimage: {image}\ncommand: [sleep, infinity]\n\
         volumes: {{state: {{target: /state}}}}\npool: {{min_size: 0}}\n\
         sync:\n  sink: {{type: local, path: {sink:?}}}\n  mappings: [{{path: .}}]\n"
    )
}

/// Every field the issue's workload is refused for, as ApplyWorkload names
/// them.
const RISKY_FIELDS: [&str; 5] = [
    "yaml.user",
    "yaml.network_mode",
    "yaml.security.cap_drop",
    "yaml.security.no_new_privileges",
    "yaml.security.pids_limit",
];

async fn workloads(c: &Cluster) -> WorkloadServiceClient<boilerhouse_proto::tls::AuthedChannel> {
    WorkloadServiceClient::new(c.channel().await)
}

async fn load_errors(c: &Cluster) -> Vec<pb::WorkloadLoadError> {
    workloads(c)
        .await
        .list_workloads(pb::ListWorkloadsRequest {})
        .await
        .unwrap()
        .into_inner()
        .load_errors
}

async fn load_error(c: &Cluster, file: &str) -> pb::WorkloadLoadError {
    load_errors(c)
        .await
        .into_iter()
        .find(|e| e.path.ends_with(file))
        .unwrap_or_else(|| panic!("{file} is not reported\n{}", c.server().log()))
}

async fn stored(c: &Cluster, id: &str) -> Result<pb::Workload, tonic::Status> {
    workloads(c)
        .await
        .get_workload(pb::GetWorkloadRequest {
            workload_id: id.into(),
        })
        .await
        .map(|r| r.into_inner().workload.unwrap())
}

/// Applies `yaml` expecting a refusal; returns the fields named and the
/// status.
async fn refused_fields(c: &Cluster, yaml: String, dry_run: bool) -> (Vec<String>, tonic::Status) {
    let err = workloads(c)
        .await
        .apply_workload(pb::ApplyWorkloadRequest {
            yaml,
            dry_run,
            ..Default::default()
        })
        .await
        .expect_err("the admission policy refuses it");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let details = err.get_error_details();
    let violations = &details
        .bad_request()
        .expect("a BadRequest")
        .field_violations;
    for v in violations {
        assert!(
            v.description.contains("admission policy"),
            "names the policy: {v:?}"
        );
    }
    (violations.iter().map(|v| v.field.clone()).collect(), err)
}

#[tokio::test]
async fn the_issues_workload_and_an_outside_sink_are_refused_by_default() {
    let Some(c) = Cluster::builder()
        .workload("risky", |image| risky(image, "risky"))
        .workload("etc-sink", |image| syncing(image, "etc-sink", "/etc"))
        .start()
        .await
    else {
        return;
    };

    // Through the directory: reported like an invalid file, never stored.
    let risky_error = load_error(&c, "risky.yaml").await;
    assert_eq!(risky_error.field, "user", "{risky_error:?}");
    for words in [
        "admission policy",
        "`allow_root = true` under [workloads.risky]",
        "network_mode",
        "security.pids_limit",
    ] {
        assert!(
            risky_error.reason.contains(words),
            "{words}: {risky_error:?}"
        );
    }
    let sink_error = load_error(&c, "etc-sink.yaml").await;
    assert_eq!(sink_error.field, "sync.sink.path", "{sink_error:?}");
    assert!(
        sink_error.reason.contains("local_sink_roots"),
        "{sink_error:?}"
    );
    assert_eq!(
        stored(&c, "risky").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        stored(&c, "etc-sink").await.unwrap_err().code(),
        Code::NotFound
    );
    let events = c.bh_ok(&["events", "--kind", "workload.invalid"]);
    assert!(
        events.contains("risky.yaml") && events.contains("admission policy"),
        "{events}"
    );

    // Through the API: every refused field named, dry run or not.
    for dry_run in [true, false] {
        let (fields, _) = refused_fields(&c, risky(c.image(), "risky-api"), dry_run).await;
        assert_eq!(fields, RISKY_FIELDS, "dry_run {dry_run}");
    }
    let cap_add = format!(
        "id: cap\nimage: {}\nsecurity: {{cap_add: [NET_ADMIN]}}\n",
        c.image()
    );
    let (fields, err) = refused_fields(&c, cap_add, false).await;
    assert_eq!(fields, ["yaml.security.cap_add"]);
    assert!(
        err.message()
            .contains("`cap_add = [\"NET_ADMIN\"]` under [workloads.cap]"),
        "{err:?}"
    );
    let (fields, _) = refused_fields(&c, syncing(c.image(), "etc-api", "/etc"), false).await;
    assert_eq!(fields, ["yaml.sync.sink.path"]);
    assert_eq!(
        stored(&c, "risky-api").await.unwrap_err().code(),
        Code::NotFound
    );

    // `bh` shows the same refusal.
    let file = boilerhouse_testkit::docker::temp_file(&risky(c.image(), "risky-bh")).unwrap();
    let said = c.bh_err(&["workload", "apply", "-f", file.path().to_str().unwrap()]);
    assert!(
        said.contains("yaml.network_mode") && said.contains("admission policy"),
        "{said}"
    );

    // A sink inside the cluster's allowed root is admitted.
    let inside = c.dir().join("sinks").display().to_string();
    workloads(&c)
        .await
        .apply_workload(pb::ApplyWorkloadRequest {
            yaml: syncing(c.image(), "inside", &inside),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", c.server().log()));
}

/// What the issue's workload needs on a host, allowed on purpose.
const RISKY_AGENT: &[&str] = &[
    "--allow-root",
    "--allow-host-network",
    "--allow-default-capabilities",
    "--allow-privilege-escalation",
    "--allow-unlimited-pids",
];

#[tokio::test]
async fn an_allowance_admits_exactly_its_workload_until_it_is_withdrawn() {
    let Some(mut c) = Cluster::builder()
        .node("admission")
        .policy(
            "[workloads.risky]\nallow_root = true\nnetwork_modes = [\"host\"]\n\
             allow_default_capabilities = true\nallow_privilege_escalation = true\n\
             allow_unlimited_pids = true\n",
        )
        .agent_args(RISKY_AGENT)
        .workload("risky", |image| risky(image, "risky"))
        .workload("copycat", |image| risky(image, "copycat"))
        .start()
        .await
    else {
        return;
    };

    // risky runs, with exactly what it asked for.
    c.wait_idle("risky", 1).await;
    let containers = c.containers().await;
    assert_eq!(containers.len(), 1, "copycat has none: {containers:?}");
    let docker_id = containers[0].id.clone().unwrap();
    let inspect = c
        .docker()
        .inspect_container(&docker_id, None)
        .await
        .unwrap();
    let host = inspect.host_config.unwrap();
    assert_eq!(host.network_mode.as_deref(), Some("host"));
    assert!(host.cap_drop.unwrap_or_default().is_empty());
    assert!(
        !host
            .security_opt
            .unwrap_or_default()
            .contains(&"no-new-privileges".to_owned())
    );
    assert_eq!(inspect.config.unwrap().user.as_deref(), Some("0:0"));

    // The same settings under another id are refused.
    let copycat = load_error(&c, "copycat.yaml").await;
    assert_eq!(copycat.field, "user", "{copycat:?}");
    assert!(
        copycat.reason.contains("[workloads.copycat]"),
        "{copycat:?}"
    );

    // Withdrawn: after a restart the stored workload goes and its idle
    // container is drained.
    std::fs::write(c.policy_file(), "").unwrap();
    c.restart_server().await;
    assert_eq!(
        stored(&c, "risky").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(load_error(&c, "risky.yaml").await.field, "user");
    let removed = c.bh_ok(&["events", "--kind", "workload.removed"]);
    assert!(removed.contains("admission policy"), "{removed}");
    c.wait_gone(&docker_id, "the withdrawn workload's container")
        .await;
}

#[test]
fn the_policy_file_comes_from_the_flag_or_the_config_file() {
    use clap::Parser as _;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "local_sink_roots = [\"/srv/sinks\"]\n").unwrap();
    let config_file = dir.path().join("c.toml");
    std::fs::write(
        &config_file,
        format!("policy_file = {:?}\n", policy.display().to_string()),
    )
    .unwrap();
    let load = |argv: &[&str]| {
        // Trust is another test's subject; plaintext keeps this one short.
        let mut all = vec!["boilerhoused", "--insecure"];
        all.extend_from_slice(argv);
        boilerhouse_server::config::Config::load(boilerhouse_server::config::Args::parse_from(all))
    };
    let from_file = load(&["--config", config_file.to_str().unwrap()]).unwrap();
    assert_eq!(from_file.policy_file.as_deref(), Some(policy.as_path()));
    assert_eq!(from_file.admission.local_sink_roots.len(), 1);
    let missing = dir.path().join("missing.toml");
    let err = load(&[
        "--config",
        config_file.to_str().unwrap(),
        "--policy-file",
        missing.to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(
        err.to_string().contains("missing.toml"),
        "the flag wins: {err}"
    );
    assert_eq!(
        load(&[]).unwrap().admission,
        boilerhouse_core::admission::AdmissionPolicy::default(),
        "strict without a file"
    );
}
