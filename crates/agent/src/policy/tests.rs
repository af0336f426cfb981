use super::*;

use boilerhouse_core::workload::parse_workload;
use boilerhouse_core::{ContainerId, NodeId, Timestamp};

fn spec(extra: &str) -> ContainerSpec {
    let workload = parse_workload("t.yaml", &format!("id: t\nimage: busybox\n{extra}")).unwrap();
    ContainerSpec::for_workload(
        &workload,
        ContainerId::from_uuid(uuid::Uuid::nil()),
        &NodeId::new("n").unwrap(),
        Timestamp::from_millis(0),
    )
}

fn policy(dir: &Path, args: PolicyArgs) -> LocalPolicy {
    let mut policy = LocalPolicy::from_args(&args, dir).unwrap();
    policy.prepare().unwrap();
    policy
}

#[test]
fn hardened_specs_are_created_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let p = policy(dir.path(), PolicyArgs::default());
    p.check_create(&spec("")).unwrap();
    p.check_create(&spec("network_mode: tenants\n"))
        .expect("a user-defined network gives nothing of the host");
}

#[test]
fn each_risk_is_refused_naming_field_and_flag() {
    let dir = tempfile::tempdir().unwrap();
    let p = policy(dir.path(), PolicyArgs::default());
    let cases = [
        (
            "user: \"0:0\"\nsecurity: {non_root: false}\n",
            "user",
            "--allow-root",
        ),
        ("security: {non_root: false}\n", "user", "--allow-root"),
        (
            "network_mode: host\n",
            "network_mode",
            "--allow-host-network",
        ),
        (
            "network_mode: \"container:x\"\n",
            "network_mode",
            "--allow-container-network",
        ),
        (
            "security: {cap_add: [NET_ADMIN]}\n",
            "cap_add",
            "--allow-cap-add NET_ADMIN",
        ),
        (
            "security: {cap_drop: []}\n",
            "cap_drop",
            "--allow-default-capabilities",
        ),
        (
            "security: {no_new_privileges: false}\n",
            "no_new_privileges",
            "--allow-privilege-escalation",
        ),
        (
            "security: {pids_limit: 0}\n",
            "pids_limit",
            "--allow-unlimited-pids",
        ),
    ];
    for (yaml, field, flag) in cases {
        let err = p.check_create(&spec(yaml)).unwrap_err();
        assert!(
            err.contains(&format!("field {field}:")) && err.contains(flag),
            "{yaml}: {err}"
        );
    }
}

#[test]
fn flags_allow_what_they_name() {
    let dir = tempfile::tempdir().unwrap();
    let all = policy(
        dir.path(),
        PolicyArgs {
            allow_root: true,
            allow_host_network: true,
            cap_add: vec!["cap_net_admin".into()],
            allow_default_capabilities: true,
            allow_privilege_escalation: true,
            allow_unlimited_pids: true,
            ..Default::default()
        },
    );
    let risky = spec(
        "user: \"0:0\"\nnetwork_mode: host\nsecurity: {non_root: false, cap_drop: [], cap_add: [NET_ADMIN], no_new_privileges: false, pids_limit: 0}\n",
    );
    all.check_create(&risky).unwrap();
    let more_caps = spec("security: {cap_add: [NET_ADMIN, SYS_ADMIN]}\n");
    let err = all.check_create(&more_caps).unwrap_err();
    assert!(
        err.contains("SYS_ADMIN") && !err.contains("allow-cap-add NET_ADMIN"),
        "{err}"
    );
    assert!(
        all.check_create(&spec("network_mode: \"container:x\"\n"))
            .is_err(),
        "host network does not imply another container's"
    );
    let any = policy(
        dir.path(),
        PolicyArgs {
            cap_add: vec!["ALL".into()],
            ..Default::default()
        },
    );
    any.check_create(&more_caps).unwrap();
    assert!(
        LocalPolicy::from_args(
            &PolicyArgs {
                cap_add: vec!["NET ADMIN".into()],
                ..Default::default()
            },
            dir.path()
        )
        .is_err()
    );
}

#[test]
fn roots_are_resolved_only_when_prepared() {
    let dir = tempfile::tempdir().unwrap();
    let args = PolicyArgs {
        sink_roots: vec![dir.path().join("a/../b")],
        ..Default::default()
    };
    let mut p = LocalPolicy::from_args(&args, dir.path()).unwrap();
    assert!(
        !dir.path().join("b").exists(),
        "parsing flags creates nothing"
    );
    p.prepare().unwrap();
    assert_eq!(
        p.sink_roots(),
        [dir.path().canonicalize().unwrap().join("b")]
    );
}

#[test]
fn the_default_sink_root_is_under_the_state_root() {
    let dir = tempfile::tempdir().unwrap();
    let p = policy(dir.path(), PolicyArgs::default());
    let real = dir.path().canonicalize().unwrap().join("sinks");
    assert_eq!(p.sink_roots(), std::slice::from_ref(&real));
    let sink = p.sink_dir(&format!("{}/a/b", real.display())).unwrap();
    assert!(sink.is_dir() && sink.starts_with(&real));
}

#[test]
fn sinks_outside_the_roots_are_refused_and_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let p = policy(
        dir.path(),
        PolicyArgs {
            sink_roots: vec![root.clone()],
            ..Default::default()
        },
    );
    let outside = dir.path().join("elsewhere/deep");
    let err = p.sink_dir(outside.to_str().unwrap()).unwrap_err();
    assert!(
        err.contains("outside the agent's sink roots") && err.contains("--allow-sink-root"),
        "{err}"
    );
    assert!(!dir.path().join("elsewhere").exists(), "nothing created");
    assert!(p.sink_dir("/etc").is_err());
    let climbing = format!("{}/../elsewhere", root.display());
    assert!(p.sink_dir(&climbing).unwrap_err().contains("'..'"));
    // A sibling whose name merely starts like the root is not beneath it.
    let sibling = format!("{}2", root.display());
    assert!(p.sink_dir(&sibling).is_err());
}

#[test]
fn a_symlink_out_of_a_root_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let p = policy(
        dir.path(),
        PolicyArgs {
            sink_roots: vec![root.clone()],
            ..Default::default()
        },
    );
    let target = dir.path().join("target");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::symlink(&target, root.join("link")).unwrap();
    let err = p
        .sink_dir(&format!("{}/link/new", root.display()))
        .unwrap_err();
    assert!(err.contains("outside the agent's sink roots"), "{err}");
    assert!(
        !target.join("new").exists(),
        "nothing created through the link"
    );
    // A symlink to a place inside a root is fine: where files go is what
    // counts.
    std::fs::create_dir(root.join("real")).unwrap();
    std::os::unix::fs::symlink(root.join("real"), root.join("inside")).unwrap();
    let ok = p.sink_dir(&format!("{}/inside/x", root.display())).unwrap();
    assert_eq!(ok, root.canonicalize().unwrap().join("real/x"));
}
