use super::*;
use proptest::prelude::*;

const FULL: &str = r#"
id: notebook
name: Python notebook
image: boilerhouse/busybox:test
command: ["sh", "-c", "sleep 1000000"]
volumes:
  state: { target: /data }
  secrets: { target: /run/secrets }
  comm: { target: /comm, read_only: false }
  custom:
    - { name: cache, target: /cache }
environment:
  MODE: dev
  WORKERS: 4
healthcheck:
  test: ["CMD", "true"]
  interval: 2s
  timeout: 1s
  retries: 5
deploy:
  resources:
    limits:
      cpus: "0.5"
      memory: 256M
read_only: true
user: "1000:1000"
network_mode: none
pool:
  min_size: 2
  max_size: 10
  idle_timeout: 10m
  affinity_timeout: 5m
  fill_concurrency: 3
  reuse: true
node_selector:
  zone: a
security:
  pids_limit: 128
sync:
  sink:
    type: s3
    bucket: tenants
    region: us-east-1
    endpoint: http://127.0.0.1:9000
    prefix: ws/${tenantId}/
  mappings:
    - path: notebooks
      direction: bidirectional
      mode: sync
    - path: ./out
      direction: upload
  policy:
    on_claim: true
    on_release: true
    interval: 5m
"#;

fn err(text: &str) -> WorkloadError {
    parse_workload("w.yaml", text).expect_err("should be rejected")
}

#[test]
fn a_full_boilerhouse_file_is_accepted() {
    let spec = parse_workload("notebook.yaml", FULL).unwrap();
    assert_eq!(spec.id.as_str(), "notebook");
    assert_eq!(spec.name, "Python notebook");
    assert_eq!(spec.command, ["sh", "-c", "sleep 1000000"]);
    assert_eq!(spec.volumes.state.as_ref().unwrap().target, "/data");
    assert!(
        spec.volumes.secrets.as_ref().unwrap().read_only,
        "secrets default to read-only"
    );
    assert_eq!(spec.volumes.custom[0].name, "cache");
    assert_eq!(spec.environment["WORKERS"], "4");
    let hc = spec.healthcheck.as_ref().unwrap();
    assert_eq!(hc.test, ["CMD", "true"]);
    assert_eq!(hc.interval, Duration::from_secs(2));
    assert_eq!(hc.retries, 5);
    assert_eq!(spec.limits.cpus, Some(0.5));
    assert_eq!(spec.limits.memory_bytes, Some(256 << 20));
    assert!(spec.read_only);
    assert_eq!(spec.user.as_deref(), Some("1000:1000"));
    assert_eq!(spec.network_mode.as_deref(), Some("none"));
    assert_eq!(spec.pool.min_size, 2);
    assert_eq!(spec.pool.max_size, 10);
    assert_eq!(spec.pool.idle_timeout, Some(Duration::from_secs(600)));
    assert_eq!(spec.pool.affinity_timeout, Duration::from_secs(300));
    assert_eq!(spec.pool.fill_concurrency, 3);
    assert_eq!(spec.node_selector["zone"], "a");
    assert_eq!(spec.security.pids_limit, 128);
    assert_eq!(
        spec.security.cap_drop,
        ["ALL"],
        "capabilities are dropped by default"
    );
    assert!(spec.security.no_new_privileges);
    let sync = spec.sync.as_ref().unwrap();
    assert!(
        matches!(&sync.sink, SyncSink::S3 { bucket, prefix, .. } if bucket == "tenants" && prefix == "ws/${tenantId}/")
    );
    assert_eq!(sync.mappings[0].mode, SyncMode::Sync);
    assert_eq!(sync.mappings[1].path, "./out");
    assert_eq!(sync.mappings[1].mode, SyncMode::Copy);
    assert_eq!(sync.policy.interval, Some(Duration::from_secs(300)));
    assert_eq!(sync.policy.on_claim_error, OnClaimError::Fail);
}

#[test]
fn a_minimal_file_gets_safe_defaults() {
    let spec = parse_workload("m.yaml", "id: m\nimage: busybox\n").unwrap();
    assert_eq!(spec.name, "m");
    assert_eq!(spec.pool.min_size, 1);
    assert_eq!(spec.pool.max_size, 4);
    assert!(spec.security.non_root);
    assert_eq!(
        spec.user.as_deref(),
        Some("65534:65534"),
        "non-root by default"
    );
    assert_eq!(spec.security.pids_limit, 512);
    assert!(spec.sync.is_none());
    assert!(spec.healthcheck.is_none());
}

#[test]
fn compose_forms_of_environment_and_healthcheck_are_accepted() {
    let spec = parse_workload(
        "c.yaml",
        "id: c\nimage: x\nenvironment: [A=1, B=two=2, C]\nhealthcheck:\n  test: test -f /ready\n",
    )
    .unwrap();
    assert_eq!(spec.environment["A"], "1");
    assert_eq!(spec.environment["B"], "two=2");
    assert_eq!(spec.environment["C"], "");
    assert_eq!(
        spec.healthcheck.unwrap().test,
        ["CMD-SHELL", "test -f /ready"]
    );
}

#[test]
fn errors_name_the_file_the_field_and_the_reason() {
    let e = err("id: x\nimage: y\npool:\n  min_size: 5\n  max_size: 2\n");
    assert_eq!(e.file, "w.yaml");
    assert_eq!(e.field, "pool.min_size");
    assert!(e.reason.contains("larger than pool.max_size"), "{e}");
    assert_eq!(
        e.to_string(),
        "w.yaml: field `pool.min_size`: 5 is larger than pool.max_size (2)"
    );
}

#[test]
fn type_errors_carry_the_serde_path() {
    let e = err("id: x\nimage: y\npool:\n  min_size: lots\n");
    assert_eq!(e.field, "pool.min_size", "{e}");
    assert!(!e.reason.is_empty());
}

#[test]
fn unknown_fields_are_rejected_so_typos_surface() {
    let e = err("id: x\nimage: y\npool:\n  min_szie: 1\n");
    assert!(e.field.starts_with("pool"), "{e}");
    assert!(e.reason.contains("min_szie"), "{e}");
}

#[test]
fn syntax_errors_name_the_file() {
    let e = err("id: x\nimage: [unclosed\n");
    assert_eq!(e.file, "w.yaml");
    assert!(!e.reason.is_empty());
    let e = err("");
    assert_eq!(e.field, "id", "an empty file is missing its id: {e}");
}

#[test]
fn specific_rules() {
    assert_eq!(err("image: y\n").field, "id");
    assert_eq!(err("id: Bad_Id\nimage: y\n").field, "id");
    assert_eq!(err("id: x\n").field, "image");
    assert_eq!(err("id: x\nimage: y\nuser: root\n").field, "user");
    assert_eq!(
        err("id: x\nimage: y\nuser: \"+0:0\"\n").field,
        "user",
        "Docker reads +0 as uid 0"
    );
    assert!(
        parse_workload(
            "w",
            "id: x\nimage: y\nuser: root\nsecurity: {non_root: false}\n"
        )
        .is_ok()
    );
    assert_eq!(
        err("id: x\nimage: y\ndeploy: {resources: {limits: {cpus: -1}}}\n").field,
        "deploy.resources.limits.cpus"
    );
    assert_eq!(
        err("id: x\nimage: y\ndeploy: {resources: {limits: {cpus: .nan}}}\n").field,
        "deploy.resources.limits.cpus"
    );
    assert_eq!(
        err("id: x\nimage: y\ndeploy: {resources: {limits: {memory: 2Q}}}\n").field,
        "deploy.resources.limits.memory"
    );
    assert_eq!(
        err("id: x\nimage: y\npool: {idle_timeout: soon}\n").field,
        "pool.idle_timeout"
    );
    assert_eq!(
        err("id: x\nimage: y\npool: {max_size: 0}\n").field,
        "pool.max_size"
    );
    assert_eq!(
        err("id: x\nimage: y\nvolumes: {state: {target: data}}\n").field,
        "volumes.state.target"
    );
    assert_eq!(
        err("id: x\nimage: y\nvolumes: {state: {target: /d}, comm: {target: /d/}}\n").field,
        "volumes.comm.target"
    );
    assert_eq!(
        err("id: x\nimage: y\nsync: {sink: {type: ftp}, mappings: [{path: a}]}\n").field,
        "sync.sink.type"
    );
    assert_eq!(
        err("id: x\nimage: y\nsync: {sink: {type: local, path: /s, prefix: all/}, mappings: [{path: a}]}\n").field,
        "sync.sink.prefix"
    );
    assert_eq!(
        err("id: x\nimage: y\nsync: {sink: {type: local, path: /s}, mappings: [{path: ../etc}]}\n")
            .field,
        "sync.mappings[0].path"
    );
    assert_eq!(
        err("id: x\nimage: y\nsync: {sink: {type: local, path: /s}, mappings: [{direction: sideways}]}\n").field,
        "sync.mappings[0].direction"
    );
    assert_eq!(
        err("id: x\nimage: y\nhealthcheck: {test: [true]}\n").field,
        "healthcheck.test"
    );
}

#[test]
fn the_spec_hash_follows_the_content() {
    let a = parse_workload("a", "id: x\nimage: y\n").unwrap();
    let a2 = parse_workload("a2", "image: y\nid: x\n").unwrap();
    let b = parse_workload("b", "id: x\nimage: z\n").unwrap();
    assert_eq!(a.spec_hash(), a2.spec_hash(), "field order does not matter");
    assert_ne!(a.spec_hash(), b.spec_hash());
    assert_eq!(a.spec_hash().len(), 16);
}

#[test]
fn the_spec_round_trips_through_json() {
    let spec = parse_workload("notebook.yaml", FULL).unwrap();
    let json = serde_json::to_string(&spec).unwrap();
    let back: WorkloadSpec = serde_json::from_str(&json).unwrap();
    assert_eq!(back, spec);
    assert_eq!(back.spec_hash(), spec.spec_hash());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any text at all yields a spec or an error, never a panic.
    #[test]
    fn arbitrary_text_never_panics(text in ".{0,300}") {
        let _ = parse_workload("fuzz.yaml", &text);
    }

    /// Mutations of a valid file yield a spec or an error naming the file.
    #[test]
    fn mutated_files_never_panic(cut in 0usize..FULL.len(), insert in "[ :\\-\\[\\]{}a-z0-9\n\"']{0,8}") {
        let mut text = FULL.to_owned();
        let cut = (0..=cut).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        text.insert_str(cut, &insert);
        match parse_workload("m.yaml", &text) {
            Ok(spec) => prop_assert!(!spec.image.is_empty()),
            Err(e) => {
                prop_assert_eq!(e.file.as_str(), "m.yaml");
                prop_assert!(!e.reason.is_empty());
            }
        }
    }

    /// Pool sizes are accepted exactly when they make sense.
    #[test]
    fn pool_size_rule(min in 0u32..50, max in 0u32..50) {
        let text = format!("id: p\nimage: i\npool: {{min_size: {min}, max_size: {max}}}\n");
        let result = parse_workload("p.yaml", &text);
        prop_assert_eq!(result.is_ok(), max >= 1 && min <= max);
    }
}

/// A workload in the original Boilerhouse format, sync fields and all.
const ORIGINAL_FORMAT: &str = r#"
id: python-worker
name: Python ML Worker
image: python:3.11-slim
volumes:
  state:
    target: /data
  secrets:
    target: /secrets
    read_only: true
healthcheck:
  test: ["CMD", "python", "-c", "print('ok')"]
  interval: 30s
  timeout: 10s
  retries: 3
deploy:
  resources:
    limits:
      cpus: "2"
      memory: 2G
read_only: true
user: "1000"
network_mode: none
pool:
  min_size: 5
  max_size: 50
  idle_timeout: 10m
sync:
  sink:
    type: s3
    bucket: ml-worker-state
    region: us-west-2
    prefix: tenants/${tenantId}/
  mappings:
    - path: /data
      pattern: "**/*.json"
      direction: bidirectional
      mode: sync
    - path: /data/notebooks
      pattern: "*.ipynb"
      sink_path: nb
      direction: upload
      mode: copy
  policy:
    on_claim: true
    on_release: true
    interval: 5m
    manual: true
"#;

#[test]
fn the_original_format_loads_with_container_paths_patterns_and_sink_paths() {
    let spec = parse_workload("python-worker.yaml", ORIGINAL_FORMAT).unwrap();
    let sync = spec.sync.unwrap();
    assert!(sync.policy.manual);
    let [data, notebooks] = &sync.mappings[..] else {
        panic!("two mappings: {:?}", sync.mappings);
    };
    // The state volume's target is the state directory itself.
    assert_eq!(data.path, "/data");
    assert_eq!(data.dir_parts().unwrap(), Vec::<String>::new());
    assert_eq!(data.key_prefix().unwrap(), "");
    assert_eq!(data.id(), "/data:**/*.json");
    assert_eq!(notebooks.dir_parts().unwrap(), vec!["notebooks"]);
    assert_eq!(notebooks.key_prefix().unwrap(), "nb");
    assert_eq!(notebooks.mode, SyncMode::Copy);
}

#[test]
fn container_paths_outside_the_state_volume_and_bad_sync_fields_are_named() {
    let with = |mapping: &str| {
        format!(
            "id: x\nimage: y\nvolumes: {{state: {{target: /data}}}}\n\
             sync: {{sink: {{type: local, path: /s}}, mappings: [{mapping}]}}\n"
        )
    };
    for (mapping, field, says) in [
        (
            "{path: /database}",
            "sync.mappings[0].path",
            "outside the state volume",
        ),
        (
            "{path: /etc}",
            "sync.mappings[0].path",
            "outside the state volume",
        ),
        (
            "{path: /data/../etc}",
            "sync.mappings[0].path",
            "outside the state volume",
        ),
        (
            "{path: /data, pattern: 'a['}",
            "sync.mappings[0].pattern",
            "not a glob",
        ),
        (
            "{path: /data, sink_path: ../x}",
            "sync.mappings[0].sink_path",
            "..",
        ),
        (
            "{path: /data}, {path: .}",
            "sync.mappings[1].path",
            "repeats sync.mappings[0]",
        ),
    ] {
        let e = parse_workload("w.yaml", &with(mapping)).unwrap_err();
        assert_eq!(e.field, field, "{mapping}: {e}");
        assert!(e.reason.contains(says), "{mapping}: {e}");
    }
    let e = parse_workload(
        "w.yaml",
        "id: x\nimage: y\nsync: {sink: {type: local, path: /s}, mappings: [{path: /data}]}\n",
    )
    .unwrap_err();
    assert_eq!(e.field, "sync.mappings[0].path");
    assert!(e.reason.contains("no volumes.state"), "{e}");
    let e = parse_workload(
        "w.yaml",
        "id: x\nimage: y\nsync: {sink: {type: s3, bucket: b, access_key_id: k}, mappings: [{path: a}]}\n",
    )
    .unwrap_err();
    assert_eq!(e.field, "sync.sink.access_key_id");
    // A nested container path resolves inside the state volume.
    let spec = parse_workload("w.yaml", &with("{path: /data/a/b/}")).unwrap();
    assert_eq!(spec.sync.unwrap().mappings[0].dir.as_deref(), Some("a/b"));
}

#[test]
fn disconnect_keeps_claims_by_default_and_replacing_is_opt_in() {
    let minimal = "id: w\nimage: busybox\n";
    let spec = parse_workload("w.yaml", minimal).unwrap();
    assert!(!spec.disconnect.replace, "the safe default keeps the claim");
    assert!(!spec.disconnect.gives_up(Duration::from_secs(86_400)));

    let replacing = format!("{minimal}disconnect:\n  replace: true\n  lost_after: 5m\n");
    let spec = parse_workload("w.yaml", &replacing).unwrap();
    assert!(!spec.disconnect.gives_up(Duration::from_secs(299)));
    assert!(spec.disconnect.gives_up(Duration::from_secs(300)));
    assert_eq!(
        spec.spec_hash(),
        parse_workload("w.yaml", minimal).unwrap().spec_hash(),
        "the policy changes no container, so it does not roll the pool"
    );

    let e = err(&format!("{minimal}disconnect:\n  lost_after: 5m\n"));
    assert_eq!(e.field, "disconnect.lost_after");
    assert!(e.reason.contains("replace"), "{e}");
    let e = err(&format!(
        "{minimal}disconnect:\n  replace: true\n  reconcile: best_score\n"
    ));
    assert_eq!(e.field, "disconnect.reconcile");
    let e = err(&format!("{minimal}disconnect:\n  replace: yes please\n"));
    assert!(e.field.starts_with("disconnect"), "{e}");
}
