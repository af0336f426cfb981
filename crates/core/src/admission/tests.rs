use super::*;
use crate::workload::parse_workload;

/// The workload of the issue: root, the host's network, every default
/// capability, setuid escalation and no process limit.
const DANGEROUS: &str = r#"
id: risky
image: busybox
user: "0:0"
network_mode: host
security:
  non_root: false
  cap_drop: []
  no_new_privileges: false
  pids_limit: 0
"#;

fn spec(yaml: &str) -> WorkloadSpec {
    parse_workload("t.yaml", yaml).unwrap()
}

fn plain(extra: &str) -> WorkloadSpec {
    spec(&format!("id: w\nimage: busybox\n{extra}"))
}

fn policy(toml: &str) -> AdmissionPolicy {
    AdmissionPolicy::parse("policy.toml", toml).unwrap()
}

fn fields(refusals: &[Refusal]) -> Vec<&str> {
    refusals.iter().map(|r| r.field.as_str()).collect()
}

fn local_sink(path: &str) -> String {
    format!(
        "volumes: {{state: {{target: /s}}}}\nsync:\n  sink: {{type: local, path: {path:?}}}\n  mappings: [{{path: .}}]\n"
    )
}

#[test]
fn hardened_defaults_are_admitted() {
    assert!(AdmissionPolicy::default().check(&plain("")).is_empty());
    let explicit = plain("user: \"1000:1000\"\nnetwork_mode: none\nsecurity: {pids_limit: 64}\n");
    assert!(AdmissionPolicy::default().check(&explicit).is_empty());
    for mode in ["bridge", "default", "none"] {
        let w = plain(&format!("network_mode: {mode}\n"));
        assert!(AdmissionPolicy::default().check(&w).is_empty(), "{mode}");
    }
}

#[test]
fn the_issues_workload_is_refused_field_by_field() {
    let refusals = AdmissionPolicy::default().check(&spec(DANGEROUS));
    assert_eq!(
        fields(&refusals),
        [
            "user",
            "network_mode",
            "security.cap_drop",
            "security.no_new_privileges",
            "security.pids_limit"
        ]
    );
    let user = &refusals[0].reason;
    assert!(user.contains("runs as root"), "{user}");
    assert!(
        user.contains("`allow_root = true` under [workloads.risky]"),
        "names the key that allows it: {user}"
    );
    assert!(refusals[1].reason.contains("network_modes = [\"host\"]"));
}

#[test]
fn each_allowance_admits_exactly_its_own_risk() {
    let all = policy(
        r#"
        [workloads.risky]
        allow_root = true
        network_modes = ["host"]
        allow_default_capabilities = true
        allow_privilege_escalation = true
        allow_unlimited_pids = true
        "#,
    );
    assert!(all.check(&spec(DANGEROUS)).is_empty());

    // Another workload gets nothing from risky's section.
    let other = DANGEROUS.replace("id: risky", "id: other");
    assert_eq!(all.check(&spec(&other)).len(), 5);

    // Each key alone lifts one refusal.
    let keys = [
        ("allow_root = true", "user"),
        ("network_modes = [\"host\"]", "network_mode"),
        ("allow_default_capabilities = true", "security.cap_drop"),
        (
            "allow_privilege_escalation = true",
            "security.no_new_privileges",
        ),
        ("allow_unlimited_pids = true", "security.pids_limit"),
    ];
    for (key, field) in keys {
        let one = policy(&format!("[workloads.risky]\n{key}\n"));
        let left = one.check(&spec(DANGEROUS));
        assert_eq!(left.len(), 4, "{key}: {left:?}");
        assert!(!fields(&left).contains(&field), "{key} allows {field}");
    }
}

#[test]
fn root_means_uid_zero_root_or_no_user_at_all() {
    let p = AdmissionPolicy::default();
    for user in ["0", "0:0", "root", "root:root", "00:1000", "+0", "-0:0"] {
        let w = plain(&format!("user: {user:?}\nsecurity: {{non_root: false}}\n"));
        assert_eq!(fields(&p.check(&w)), ["user"], "{user}");
    }
    // non_root false without a user: the image decides, which may be root.
    let image_user = plain("security: {non_root: false}\n");
    let refusals = p.check(&image_user);
    assert_eq!(fields(&refusals), ["security.non_root"]);
    assert!(refusals[0].reason.contains("image's own user"));
    // non_root false with a named non-root user is not root.
    let named = plain("user: \"1000\"\nsecurity: {non_root: false}\n");
    assert!(p.check(&named).is_empty());
    assert!(!is_root_user("1000:0"), "gid 0 is not uid 0");
    assert!(!is_root_user("rooted"));
    assert!(!is_root_user("+") && !is_root_user(""));
}

#[test]
fn added_capabilities_need_each_one_allowed() {
    let w = plain("security: {cap_add: [net_admin, CAP_SYS_TIME]}\n");
    let refusals = AdmissionPolicy::default().check(&w);
    assert_eq!(fields(&refusals), ["security.cap_add", "security.cap_add"]);
    assert!(refusals[0].reason.contains("NET_ADMIN"));
    assert!(refusals[1].reason.contains("SYS_TIME"));

    let one = policy("[workloads.w]\ncap_add = [\"CAP_NET_ADMIN\"]\n");
    let left = one.check(&w);
    assert_eq!(left.len(), 1);
    assert!(left[0].reason.contains("SYS_TIME"), "{left:?}");

    let any = policy("[workloads.w]\ncap_add = [\"all\"]\n");
    assert!(any.check(&w).is_empty());
}

#[test]
fn cap_drop_must_hold_all() {
    let partial = plain("security: {cap_drop: [NET_RAW]}\n");
    assert_eq!(
        fields(&AdmissionPolicy::default().check(&partial)),
        ["security.cap_drop"]
    );
    let lower = plain("security: {cap_drop: [all]}\n");
    assert!(AdmissionPolicy::default().check(&lower).is_empty());
}

#[test]
fn negative_pids_limits_are_unlimited_too() {
    let w = plain("security: {pids_limit: -1}\n");
    assert_eq!(
        fields(&AdmissionPolicy::default().check(&w)),
        ["security.pids_limit"]
    );
}

#[test]
fn networks_other_than_the_safe_three_need_an_allowance() {
    let p = AdmissionPolicy::default();
    let container = plain("network_mode: \"container:db\"\n");
    assert_eq!(fields(&p.check(&container)), ["network_mode"]);
    let named = plain("network_mode: tenants\n");
    let refusals = p.check(&named);
    assert_eq!(fields(&refusals), ["network_mode"]);
    assert!(refusals[0].reason.contains("top level"), "{refusals:?}");

    let global = policy("network_modes = [\"tenants\"]\n");
    assert!(global.check(&named).is_empty());
    assert_eq!(global.check(&container).len(), 1);

    let own = policy("[workloads.w]\nnetwork_modes = [\"container:db\"]\n");
    assert!(own.check(&container).is_empty());
}

#[test]
fn local_sinks_must_lie_under_a_root() {
    let p = AdmissionPolicy::default();
    let w = plain(&local_sink("/etc"));
    let refusals = p.check(&w);
    assert_eq!(fields(&refusals), ["sync.sink.path"]);
    assert!(
        refusals[0].reason.contains("allows no local sinks")
            && refusals[0].reason.contains("`local_sink_roots`"),
        "says which key to set: {refusals:?}"
    );

    let rooted = policy("local_sink_roots = [\"/srv/sinks\", \"./data/sync\"]\n");
    for ok in [
        "/srv/sinks",
        "/srv/sinks/",
        "/srv/sinks/a/b",
        "/srv//sinks/./a",
    ] {
        assert!(rooted.check(&plain(&local_sink(ok))).is_empty(), "{ok}");
    }
    for ok in ["./data/sync", "data/sync/x", "data/./sync"] {
        assert!(rooted.check(&plain(&local_sink(ok))).is_empty(), "{ok}");
    }
    for refused in [
        "/etc",
        "/srv/sinks2",
        "/srv",
        "/data/sync",
        "./data",
        "sync",
    ] {
        let refusals = rooted.check(&plain(&local_sink(refused)));
        assert_eq!(fields(&refusals), ["sync.sink.path"], "{refused}");
        assert!(refusals[0].reason.contains("not under an allowed root"));
    }
    let climbing = rooted.check(&plain(&local_sink("/srv/sinks/../../etc")));
    assert!(climbing[0].reason.contains("'..'"), "{climbing:?}");

    let per_workload = policy("[workloads.w]\nlocal_sink_roots = [\"/etc\"]\n");
    assert!(per_workload.check(&plain(&local_sink("/etc/x"))).is_empty());
    let other = spec(&format!("id: v\nimage: busybox\n{}", local_sink("/etc/x")));
    assert_eq!(per_workload.check(&other).len(), 1);
}

#[test]
fn s3_sinks_are_not_paths() {
    let w = plain(
        "volumes: {state: {target: /s}}\nsync:\n  sink: {type: s3, bucket: b}\n  mappings: [{path: .}]\n",
    );
    assert!(AdmissionPolicy::default().check(&w).is_empty());
}

#[test]
fn lexical_paths() {
    let p = |s: &str| LexicalPath::parse(s).unwrap();
    assert_eq!(p("/a/./b//c/").to_string(), "/a/b/c");
    assert_eq!(p("./x").to_string(), "x");
    assert_eq!(p(".").to_string(), ".");
    assert_eq!(p("/").to_string(), "/");
    assert!(p("/a/b").is_under(&p("/")));
    assert!(p("x").is_under(&p(".")));
    assert!(!p("/x").is_under(&p(".")), "absolute never under relative");
    assert!(!p("x").is_under(&p("/")), "relative never under absolute");
    assert!(LexicalPath::parse("a/../b").is_err());
    assert!(LexicalPath::parse("").is_err());
}

#[test]
fn container_specs_are_judged_by_the_same_rules() {
    let w = spec(DANGEROUS);
    let c = ContainerSpec::for_workload(
        &w,
        crate::ContainerId::from_uuid(uuid::Uuid::nil()),
        &crate::NodeId::new("n").unwrap(),
        crate::Timestamp::from_millis(0),
    );
    let found = risks(&Settings::of_container(&c));
    assert_eq!(found, risks(&Settings::of_workload(&w)));
    let container_fields: Vec<&str> = found.iter().map(Risk::container_field).collect();
    assert_eq!(
        container_fields,
        [
            "user",
            "network_mode",
            "cap_drop",
            "no_new_privileges",
            "pids_limit"
        ]
    );
}

#[test]
fn policy_files_are_checked() {
    let err = |toml: &str| AdmissionPolicy::parse("p.toml", toml).unwrap_err();
    let unknown = err("[workloads.w]\nallow_rot = true\n");
    assert!(unknown.to_string().contains("allow_rot"), "{unknown}");
    assert!(unknown.to_string().contains("line 2"), "{unknown}");
    assert!(
        err("local_sink_root = []\n")
            .to_string()
            .contains("local_sink_root")
    );
    assert_eq!(err("[workloads.Bad_Id]\n").key, "workloads.Bad_Id");
    assert_eq!(
        err("[workloads.w]\ncap_add = [\"NET ADMIN\"]\n").key,
        "workloads.w.cap_add[0]"
    );
    assert_eq!(
        err("local_sink_roots = [\"/a/../etc\"]\n").key,
        "local_sink_roots[0]"
    );
    let host = err("network_modes = [\"host\"]\n");
    assert_eq!(host.key, "network_modes[0]");
    assert!(host.reason.contains("[workloads.<id>]"), "{host}");
    assert_eq!(
        AdmissionPolicy::parse("p.toml", "").unwrap(),
        AdmissionPolicy::default()
    );
}
