use super::*;
use crate::container::StateFile;
use crate::ids::{TenantId, Uuid};
use crate::workload::Limits;
use proptest::prelude::*;

const CONFIG: PlanConfig = PlanConfig {
    lost_grace: Duration::from_secs(30),
    creation_grace: Duration::from_secs(60),
};

fn t(s: i64) -> Timestamp {
    Timestamp::from_millis(s * 1000)
}

fn node(n: &str) -> NodeId {
    NodeId::new(n).unwrap()
}

fn wl(w: &str) -> WorkloadId {
    WorkloadId::new(w).unwrap()
}

fn cid(n: u128) -> ContainerId {
    ContainerId::from_uuid(Uuid::from_u128(n))
}

fn row(
    n: u128,
    node_name: &str,
    workload: &str,
    state: ContainerState,
    updated: i64,
) -> ContainerRecord {
    ContainerRecord {
        id: cid(n),
        workload_id: wl(workload),
        node_id: node(node_name),
        docker_id: Some(format!("docker-{n}")),
        state,
        spec_hash: "h1".into(),
        tenant_id: (state == ContainerState::Claimed)
            .then(|| TenantId::new(format!("t{n}")).unwrap()),
        last_tenant_id: None,
        claim_generation: 1,
        revision: 0,
        limits: Limits::default(),
        state_path: String::new(),
        comm_path: String::new(),
        created_at: t(updated),
        updated_at: t(updated),
    }
}

fn observed(
    id: Option<ContainerId>,
    node_name: &str,
    workload: &str,
    hash: &str,
    created: i64,
) -> ObservedContainer {
    let mut l = BTreeMap::new();
    l.insert(labels::MANAGED.to_owned(), "true".to_owned());
    l.insert(labels::NODE_ID.to_owned(), node_name.to_owned());
    l.insert(labels::WORKLOAD_ID.to_owned(), workload.to_owned());
    l.insert(labels::SPEC_HASH.to_owned(), hash.to_owned());
    l.insert(labels::CREATED_AT.to_owned(), (created * 1000).to_string());
    if let Some(id) = id {
        l.insert(labels::CONTAINER_ID.to_owned(), id.to_string());
    }
    ObservedContainer {
        docker_id: format!(
            "docker-{}",
            id.map(|i| i.as_uuid().as_u128()).unwrap_or(999)
        ),
        name: id
            .map(|i| i.docker_name())
            .unwrap_or_else(|| "stray".into()),
        labels: l.into(),
        docker_state: "running".into(),
        health: None,
        health_output: None,
        exit_code: 0,
        started_at: Some(t(created)),
        oom_killed: false,
        limits: Limits::default(),
        state_file: None,
    }
}

fn desired(rows: Vec<ContainerRecord>) -> Desired {
    Desired {
        containers: rows.into_iter().map(std::sync::Arc::new).collect(),
        workloads: BTreeMap::from([(wl("demo"), "h1".to_owned())]),
        ..Default::default()
    }
}

fn known(containers: Vec<ObservedContainer>) -> Evidence {
    Evidence::Known {
        observed_at: t(1000),
        containers: containers.into_iter().map(std::sync::Arc::new).collect(),
    }
}

#[test]
fn a_row_missing_from_a_fresh_report_is_lost_after_the_grace_period() {
    let d = desired(vec![row(1, "a", "demo", ContainerState::Claimed, 990)]);
    let obs = BTreeMap::from([(node("a"), known(vec![]))]);
    let actions = plan(&d, &obs, t(1000), &CONFIG);
    assert_eq!(actions.len(), 1);
    assert!(
        matches!(actions[0].kind, ActionKind::MarkLost { container_id } if container_id == cid(1))
    );
    assert_eq!(
        actions[0].not_before,
        Some(t(1020)),
        "deferred until the grace passes"
    );
    assert!(!actions[0].is_due(t(1000)));
    assert!(actions[0].is_due(t(1020)));
    assert!(
        actions[0].reason.contains("missing"),
        "{}",
        actions[0].reason
    );
}

#[test]
fn a_managed_container_without_a_row_is_adopted_when_its_pool_is_current() {
    let mut o = observed(Some(cid(7)), "a", "demo", "h1", 900);
    o.state_file = Some(StateFile {
        tenant_id: Some(TenantId::new("t7").unwrap()),
        claim_generation: 3,
        ..Default::default()
    });
    let obs = BTreeMap::from([(node("a"), known(vec![o]))]);
    let actions = plan(&desired(vec![]), &obs, t(1000), &CONFIG);
    assert_eq!(actions.len(), 1);
    let ActionKind::Adopt { observed } = &actions[0].kind else {
        panic!("{actions:?}")
    };
    assert_eq!(
        observed
            .state_file
            .as_ref()
            .unwrap()
            .tenant_id
            .as_ref()
            .unwrap()
            .as_str(),
        "t7"
    );
    assert!(actions[0].is_due(t(1000)));
}

#[test]
fn a_labelled_container_never_started_is_left_alone_until_it_starts_or_its_grace_passes() {
    let mut o = observed(Some(cid(8)), "a", "demo", "h1", 990);
    o.docker_state = "created".into();
    let obs = BTreeMap::from([(node("a"), known(vec![o.clone()]))]);
    let actions = plan(&desired(vec![]), &obs, t(1000), &CONFIG);
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert!(
        matches!(actions[0].kind, ActionKind::Destroy { .. }),
        "{actions:?}"
    );
    assert!(
        !actions[0].is_due(t(1000)),
        "not adopted, not destroyed yet"
    );
    assert!(
        actions[0].is_due(t(990 + 60)),
        "destroyed once its grace passed"
    );
    // Started meanwhile: adopted.
    o.docker_state = "running".into();
    let obs = BTreeMap::from([(node("a"), known(vec![o]))]);
    let actions = plan(&desired(vec![]), &obs, t(1000), &CONFIG);
    assert!(
        matches!(actions[0].kind, ActionKind::Adopt { .. }),
        "{actions:?}"
    );
}

#[test]
fn unknown_pools_and_stale_specs_are_destroyed_after_the_creation_grace() {
    let obs = BTreeMap::from([(
        node("a"),
        known(vec![
            observed(Some(cid(8)), "a", "gone", "h1", 990),
            observed(Some(cid(9)), "a", "demo", "old", 100),
        ]),
    )]);
    let actions = plan(&desired(vec![]), &obs, t(1000), &CONFIG);
    assert_eq!(actions.len(), 2);
    let unknown = actions
        .iter()
        .find(|a| a.container_id() == Some(cid(8)))
        .unwrap();
    assert!(matches!(unknown.kind, ActionKind::Destroy { .. }));
    assert_eq!(
        unknown.not_before,
        Some(t(1050)),
        "young: wait out the creation grace"
    );
    assert!(
        unknown.reason.contains("not configured"),
        "{}",
        unknown.reason
    );
    let stale = actions
        .iter()
        .find(|a| a.container_id() == Some(cid(9)))
        .unwrap();
    assert!(stale.is_due(t(1000)));
    assert!(stale.reason.contains("stale"), "{}", stale.reason);
}

#[test]
fn an_unconfigured_pool_drains_its_idle_containers_and_keeps_claimed_ones() {
    let d = desired(vec![
        row(1, "a", "gone", ContainerState::Idle, 0),
        row(2, "a", "gone", ContainerState::Claimed, 0),
    ]);
    let obs = BTreeMap::from([(
        node("a"),
        known(vec![
            observed(Some(cid(1)), "a", "gone", "h1", 0),
            observed(Some(cid(2)), "a", "gone", "h1", 0),
        ]),
    )]);
    let actions = plan(&d, &obs, t(1000), &CONFIG);
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert!(
        matches!(actions[0].kind, ActionKind::Drain { container_id } if container_id == cid(1))
    );
}

#[test]
fn missing_evidence_plans_nothing_for_that_node() {
    let d = desired(vec![row(1, "a", "demo", ContainerState::Claimed, 0)]);
    let obs = BTreeMap::from([(node("a"), Evidence::Unknown)]);
    assert!(plan(&d, &obs, t(1000), &CONFIG).is_empty());
    // A node with no entry at all is the same as Unknown.
    assert!(plan(&d, &BTreeMap::new(), t(1000), &CONFIG).is_empty());
}

// ---- properties ----------------------------------------------------------

#[derive(Debug, Clone)]
struct World {
    desired: Desired,
    observed: BTreeMap<NodeId, Evidence>,
}

const NODES: [&str; 3] = ["a", "b", "c"];
const WORKLOADS: [&str; 2] = ["demo", "gone"];
const STATES: [ContainerState; 6] = [
    ContainerState::Warming,
    ContainerState::Idle,
    ContainerState::Claimed,
    ContainerState::Reserved,
    ContainerState::Draining,
    ContainerState::Lost,
];

/// A generated stray: (node index, workload index, with an id, created,
/// current spec).
type Stray = (usize, usize, bool, i64, bool);

/// Managed containers with no row, reported on `nodes[n]`.
fn add_strays(
    seen: &mut BTreeMap<NodeId, Vec<ObservedContainer>>,
    nodes: &[&str],
    strays: Vec<Stray>,
) {
    for (i, (n, w, with_id, created, current)) in strays.into_iter().enumerate() {
        let workload = ["demo", "gone", "Bad Name"][w];
        let id = with_id.then(|| cid(1000 + i as u128));
        let hash = if current { "h1" } else { "old" };
        seen.entry(node(nodes[n]))
            .or_default()
            .push(observed(id, nodes[n], workload, hash, created));
    }
}

/// Each node's evidence: what it reported when fresh, Unknown otherwise.
fn evidence_of(
    nodes: &[&str],
    fresh: Vec<bool>,
    mut seen: BTreeMap<NodeId, Vec<ObservedContainer>>,
) -> BTreeMap<NodeId, Evidence> {
    nodes
        .iter()
        .zip(fresh)
        .map(|(n, fresh)| {
            let e = if fresh {
                known(seen.remove(&node(n)).unwrap_or_default())
            } else {
                Evidence::Unknown
            };
            (node(n), e)
        })
        .collect()
}

fn world() -> impl Strategy<Value = World> {
    let rows = proptest::collection::vec(
        (0usize..3, 0usize..2, 0usize..6, 900i64..1001, any::<bool>()),
        0..12,
    );
    let strays = proptest::collection::vec(
        (
            0usize..3,
            0usize..3,
            any::<bool>(),
            900i64..1001,
            any::<bool>(),
        ),
        0..6,
    );
    let evidence = proptest::collection::vec(any::<bool>(), 3);
    (rows, strays, evidence).prop_map(|(rows, strays, evidence)| {
        let mut containers = Vec::new();
        let mut seen: BTreeMap<NodeId, Vec<ObservedContainer>> = BTreeMap::new();
        for (i, (n, w, s, updated, present)) in rows.into_iter().enumerate() {
            let r = row(i as u128 + 1, NODES[n], WORKLOADS[w], STATES[s], updated);
            if present {
                seen.entry(r.node_id.clone()).or_default().push(observed(
                    Some(r.id),
                    NODES[n],
                    WORKLOADS[w],
                    "h1",
                    updated,
                ));
            }
            containers.push(r);
        }
        add_strays(&mut seen, &NODES, strays);
        let observed = evidence_of(&NODES, evidence, seen);
        World {
            desired: desired(containers),
            observed,
        }
    })
}

/// What applying `actions` does to the world, as the server's apply step
/// does it.
fn apply(mut w: World, actions: &[Action]) -> World {
    for a in actions {
        match &a.kind {
            ActionKind::MarkLost { container_id } => {
                w.desired.containers.retain(|c| c.id != *container_id)
            }
            ActionKind::Reclaim { container_id, .. } => {
                // Set aside for its tenant: no longer unused.
                for c in &mut w.desired.containers {
                    if c.id == *container_id {
                        std::sync::Arc::make_mut(c).state = ContainerState::Lost;
                    }
                }
            }
            ActionKind::Drain { container_id } => {
                // Draining removes the container from Docker and the row.
                w.desired.containers.retain(|c| c.id != *container_id);
                if let Some(Evidence::Known { containers, .. }) = w.observed.get_mut(&a.node_id) {
                    containers.retain(|o| o.container_id() != Some(*container_id));
                }
            }
            ActionKind::Destroy { docker_id, .. } => {
                if let Some(Evidence::Known { containers, .. }) = w.observed.get_mut(&a.node_id) {
                    containers.retain(|o| &o.docker_id != docker_id);
                }
            }
            ActionKind::Resume { container_id } => {
                for c in w
                    .desired
                    .containers
                    .iter_mut()
                    .filter(|c| c.id == *container_id)
                {
                    let c = std::sync::Arc::make_mut(c);
                    c.state = if c.tenant_id.is_some() {
                        ContainerState::Claimed
                    } else {
                        ContainerState::Idle
                    };
                }
            }
            ActionKind::Adopt { observed } => {
                let tenant = observed
                    .state_file
                    .as_ref()
                    .and_then(|s| s.tenant_id.clone());
                let mut r = row(
                    0,
                    a.node_id.as_str(),
                    observed.workload_id().unwrap().as_str(),
                    ContainerState::Idle,
                    1000,
                );
                r.id = observed.container_id().unwrap();
                r.state = if tenant.is_some() {
                    ContainerState::Claimed
                } else {
                    ContainerState::Idle
                };
                r.tenant_id = tenant;
                w.desired.containers.push(std::sync::Arc::new(r));
            }
        }
    }
    w
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A container on a node without fresh evidence is never destroyed,
    /// drained for loss, or marked lost; and a claimed container is never
    /// destroyed at all.
    #[test]
    fn nothing_destructive_on_missing_evidence(w in world()) {
        for a in plan(&w.desired, &w.observed, t(1000), &CONFIG) {
            let evidence = w.observed.get(&a.node_id).unwrap_or(&Evidence::Unknown);
            let destructive = matches!(a.kind, ActionKind::MarkLost { .. } | ActionKind::Destroy { .. });
            prop_assert!(!(destructive && *evidence == Evidence::Unknown), "{a:?} on missing evidence");
            if let Some(id) = a.container_id() {
                let claimed = w.desired.containers.iter().any(|c| c.id == id && c.state == ContainerState::Claimed);
                prop_assert!(!(claimed && matches!(a.kind, ActionKind::Destroy { .. } | ActionKind::Drain { .. })), "{a:?} targets a claimed container");
            }
        }
    }

    /// Applying every due action and planning again leaves nothing due.
    #[test]
    fn applying_a_plan_converges(w in world()) {
        let now = t(1000);
        let due: Vec<Action> = plan(&w.desired, &w.observed, now, &CONFIG).into_iter().filter(|a| a.is_due(now)).collect();
        let after = apply(w, &due);
        let again: Vec<Action> = plan(&after.desired, &after.observed, now, &CONFIG).into_iter().filter(|a| a.is_due(now)).collect();
        prop_assert!(again.is_empty(), "left after applying: {again:?}");
    }
}

#[test]
fn an_idle_row_whose_container_a_tenant_held_is_reclaimed_never_offered() {
    // The database was restored from a backup older than t2's claim.
    let mut unused = row(1, "a", "demo", ContainerState::Idle, 900);
    unused.claim_generation = 0;
    let d = desired(vec![unused]);
    let mut o = observed(Some(cid(1)), "a", "demo", "h1", 900);
    o.state_file = Some(StateFile {
        tenant_id: Some(TenantId::new("t2").unwrap()),
        claim_generation: 3,
        ..Default::default()
    });
    let obs = BTreeMap::from([(node("a"), known(vec![o]))]);
    let actions = plan(&d, &obs, t(1000), &CONFIG);
    assert_eq!(actions.len(), 1, "{actions:?}");
    let ActionKind::Reclaim {
        container_id,
        state,
    } = &actions[0].kind
    else {
        panic!("{actions:?}");
    };
    assert_eq!(*container_id, cid(1));
    assert!(
        actions[0].is_due(t(1000)),
        "at once: it must not be offered"
    );
    assert!(actions[0].reason.contains("t2"), "{}", actions[0].reason);

    let mut index = crate::pool::index::Index::default();
    index.apply(&crate::pool::write::PoolWrite {
        containers: vec![crate::pool::write::ContainerChange::Insert(
            (*d.containers[0]).clone(),
        )],
        ..Default::default()
    });
    // Stopped, it is drained: it served t2 and never serves anyone else.
    let (write, claim) = crate::pool::decide::reclaim(
        &index,
        container_id,
        state,
        false,
        "c2".into(),
        "restored",
        t(1000),
    )
    .expect("an unused row is decided");
    assert!(claim.is_none());
    assert!(
        write.containers.iter().any(|c| matches!(
            c,
            crate::pool::write::ContainerChange::Update { record, .. }
                if record.state == ContainerState::Draining
        )),
        "{write:?}"
    );
    // Running, it goes back to t2 at once, past the file's generation.
    let (write, claim) = crate::pool::decide::reclaim(
        &index,
        container_id,
        state,
        true,
        "c2".into(),
        "restored",
        t(1000),
    )
    .unwrap();
    index.apply(&write);
    let claim = claim.expect("t2 has it back");
    assert_eq!(claim.tenant_id.as_str(), "t2");
    assert_eq!(
        claim.generation, 4,
        "the fencing token moves past the file's"
    );
    assert_eq!(
        index.container(&cid(1)).unwrap().state,
        ContainerState::Claimed
    );
    assert_eq!(index.idle(&wl("demo")).count(), 0, "never offered");
    assert!(index.check().is_empty(), "{:?}", index.check());
}

#[test]
fn a_claimed_container_back_stopped_ends_its_claim() {
    let d = desired(vec![row(1, "a", "demo", ContainerState::Claimed, 100)]);
    let mut o = observed(Some(cid(1)), "a", "demo", "h1", 100);
    o.docker_state = "exited".into();
    let obs = BTreeMap::from([(node("a"), known(vec![o.clone()]))]);
    let actions = plan(&d, &obs, t(1000), &CONFIG);
    assert!(
        matches!(actions.as_slice(), [a] if matches!(a.kind, ActionKind::MarkLost { container_id } if container_id == cid(1)) && a.is_due(t(1000))),
        "{actions:?}"
    );
    o.docker_state = "running".into();
    let obs = BTreeMap::from([(node("a"), known(vec![o]))]);
    assert!(plan(&d, &obs, t(1000), &CONFIG).is_empty());
}

mod scope;
