use super::*;

fn token(scope: &str) -> Principal {
    Principal::Token {
        name: "t".into(),
        scope: Scope::parse(scope).unwrap(),
    }
}

fn node(name: &str) -> Principal {
    Principal::Node(NodeId::new(name).unwrap())
}

fn tenant(id: &str) -> TenantId {
    TenantId::new(id).unwrap()
}

const CLAIM: &str = "/boilerhouse.v1.ClaimService/Claim";
const DRAIN: &str = "/boilerhouse.v1.NodeService/DrainNode";
const CONNECT: &str = "/boilerhouse.v1.AgentService/Connect";
const HEALTH: &str = "/grpc.health.v1.Health/Check";
const REFLECT: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";

#[test]
fn scopes_parse_and_print_alike() {
    for s in ["admin", "operator", "tenant:acme-1"] {
        assert_eq!(Scope::parse(s).unwrap().to_string(), s);
    }
    assert!(
        Scope::parse("root")
            .unwrap_err()
            .contains("admin, operator")
    );
    assert!(Scope::parse("tenant:../x").is_err());
    assert!(Scope::parse("tenant:").is_err());
}

#[test]
fn no_credentials_reach_only_health() {
    assert_eq!(authorize(None, HEALTH), Ok(()));
    for method in [CLAIM, DRAIN, REFLECT] {
        let Err(Denied::Unauthenticated(m)) = authorize(None, method) else {
            panic!("{method} admitted an anonymous caller");
        };
        assert!(m.contains("Bearer"), "{m}");
    }
    let Err(Denied::Unauthenticated(m)) = authorize(None, CONNECT) else {
        panic!("Connect admitted an anonymous caller");
    };
    assert!(m.contains("certificate"), "{m}");
}

#[test]
fn tenant_tokens_reach_only_tenant_methods() {
    let t = token("tenant:acme");
    assert_eq!(authorize(Some(&t), CLAIM), Ok(()));
    assert_eq!(authorize(Some(&t), REFLECT), Ok(()));
    let Err(Denied::PermissionDenied(m)) = authorize(Some(&t), DRAIN) else {
        panic!("a tenant token drained a node");
    };
    assert!(m.contains("operator"), "names the scope needed: {m}");
    assert!(matches!(
        authorize(
            Some(&t),
            "/boilerhouse.v1.AffinityService/RevokeReservation"
        ),
        Err(Denied::PermissionDenied(_))
    ));
    assert!(matches!(
        authorize(Some(&t), "/boilerhouse.v1.SyncService/TriggerSync"),
        Err(Denied::PermissionDenied(_))
    ));
    assert_eq!(t.may_act_for(&tenant("acme")), Ok(()));
    let Err(Denied::PermissionDenied(m)) = t.may_act_for(&tenant("other")) else {
        panic!("a tenant token acted for another tenant");
    };
    assert!(m.contains("other") && m.contains("tenant:acme"), "{m}");
    assert_eq!(t.own_tenant(), Some(&tenant("acme")));
}

#[test]
fn operators_and_admins_act_for_any_tenant() {
    for scope in ["operator", "admin"] {
        let p = token(scope);
        for method in [
            CLAIM,
            DRAIN,
            "/boilerhouse.v1.WorkloadService/ApplyWorkload",
        ] {
            assert_eq!(authorize(Some(&p), method), Ok(()), "{scope} {method}");
        }
        assert_eq!(p.may_act_for(&tenant("anyone")), Ok(()));
        assert_eq!(p.own_tenant(), None);
    }
}

#[test]
fn only_admins_reach_the_admin_service() {
    const BACKUP: &str = "/boilerhouse.v1.AdminService/BackupDatabase";
    assert_eq!(authorize(Some(&token("admin")), BACKUP), Ok(()));
    for scope in ["operator", "tenant:acme"] {
        let Err(Denied::PermissionDenied(m)) = authorize(Some(&token(scope)), BACKUP) else {
            panic!("a {scope} token took a backup");
        };
        assert!(m.contains("needs scope admin"), "{m}");
    }
    assert!(matches!(
        authorize(Some(&node("n1")), BACKUP),
        Err(Denied::PermissionDenied(_))
    ));
    assert!(matches!(
        authorize(None, BACKUP),
        Err(Denied::Unauthenticated(_))
    ));
}

#[test]
fn certificates_and_tokens_do_not_stand_in_for_each_other() {
    let n = node("n1");
    assert_eq!(authorize(Some(&n), CONNECT), Ok(()));
    for method in [CLAIM, DRAIN, REFLECT] {
        assert!(
            matches!(
                authorize(Some(&n), method),
                Err(Denied::PermissionDenied(_))
            ),
            "a node certificate reached {method}"
        );
    }
    assert!(n.may_act_for(&tenant("acme")).is_err());
    for scope in ["admin", "operator", "tenant:acme"] {
        assert!(
            matches!(
                authorize(Some(&token(scope)), CONNECT),
                Err(Denied::PermissionDenied(_))
            ),
            "a {scope} token opened Connect"
        );
    }
}

#[test]
fn unknown_methods_are_refused_even_for_admins() {
    for method in [
        "/boilerhouse.v1.SecretService/Dump",
        "/boilerhouse.v1.AgentService/Other",
        "/boilerhouse.v1.ClaimService/",
        "/boilerhouse.v1.ClaimService/Claim/x",
        "boilerhouse.v1.ClaimService/Claim",
        "",
    ] {
        assert!(
            matches!(
                authorize(Some(&token("admin")), method),
                Err(Denied::PermissionDenied(_))
            ),
            "{method:?} admitted"
        );
    }
}

#[test]
fn insecure_callers_may_do_everything_listed() {
    for method in [CLAIM, DRAIN, CONNECT, REFLECT] {
        assert_eq!(authorize(Some(&Principal::Insecure), method), Ok(()));
    }
}

#[test]
fn principals_print_without_secrets() {
    assert_eq!(token("tenant:a").to_string(), "token:t (tenant:a)");
    assert_eq!(node("n1").to_string(), "node:n1");
}
