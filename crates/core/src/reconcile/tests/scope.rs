//! A reconcile pass scoped to some nodes plans for them what a whole
//! pass plans.

use super::*;

/// Rows on four nodes, each one's container reported on its own node, on
/// another, or nowhere; strays; evidence per node; and a scope.
fn scoped_world() -> impl Strategy<
    Value = (
        crate::pool::index::Index,
        BTreeMap<NodeId, Evidence>,
        BTreeSet<NodeId>,
    ),
> {
    const ON: [&str; 4] = ["a", "b", "c", "d"];
    let rows = proptest::collection::vec(
        (
            0usize..4,
            0usize..2,
            0usize..6,
            900i64..1001,
            0usize..6,
            any::<bool>(),
        ),
        0..16,
    );
    let strays = proptest::collection::vec(
        (
            0usize..4,
            0usize..3,
            any::<bool>(),
            900i64..1001,
            any::<bool>(),
        ),
        0..6,
    );
    let evidence = proptest::collection::vec(any::<bool>(), 4);
    let scope = proptest::collection::vec(any::<bool>(), 4);
    (rows, strays, evidence, scope).prop_map(|(rows, strays, evidence, scope)| {
        let mut containers = Vec::new();
        let mut seen: BTreeMap<NodeId, Vec<ObservedContainer>> = BTreeMap::new();
        for (i, (n, w, s, updated, reported_on, held)) in rows.into_iter().enumerate() {
            let r = row(i as u128 + 1, ON[n], WORKLOADS[w], STATES[s], updated);
            // 0..4: reported on that node (its own or another); else not at all.
            if let Some(on) = ON.get(reported_on) {
                let mut o = observed(Some(r.id), on, WORKLOADS[w], "h1", updated);
                if held {
                    o.state_file = Some(StateFile {
                        tenant_id: Some(TenantId::new("t9").unwrap()),
                        claim_generation: 5,
                        ..Default::default()
                    });
                }
                seen.entry(node(on)).or_default().push(o);
            }
            containers.push(r);
        }
        add_strays(&mut seen, &ON, strays);
        let observed = evidence_of(&ON, evidence, seen);
        let scope = ON
            .iter()
            .zip(scope)
            .filter(|(_, s)| *s)
            .map(|(n, _)| node(n))
            .collect();
        (
            crate::pool::index::Index::from_rows(containers, [], []),
            observed,
            scope,
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// A pass scoped to some nodes plans for them exactly what a pass over
    /// every row plans for them, in the same order, whether given every
    /// node's evidence or only theirs.
    #[test]
    fn a_scoped_pass_plans_what_the_whole_pass_plans_for_its_nodes(
        (index, observed, scope) in scoped_world()
    ) {
        let workloads = BTreeMap::from([(wl("demo"), "h1".to_owned())]);
        let gather = |scope: Option<&BTreeSet<NodeId>>, observed: &BTreeMap<NodeId, Evidence>| {
            let mut d = Desired::gather(&index, workloads.clone(), scope);
            d.find_rows_elsewhere(&index, observed);
            d
        };
        let whole: Vec<Action> = plan(
            &gather(None, &observed),
            &observed,
            t(1000),
            &CONFIG,
        )
        .into_iter()
        .filter(|a| scope.contains(&a.node_id))
        .collect();
        let scoped = plan(
            &gather(Some(&scope), &observed),
            &observed,
            t(1000),
            &CONFIG,
        );
        prop_assert_eq!(&scoped, &whole);
        let theirs: BTreeMap<NodeId, Evidence> = observed
            .iter()
            .filter(|(n, _)| scope.contains(*n))
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        let scoped_on_theirs = plan(
            &gather(Some(&scope), &theirs),
            &theirs,
            t(1000),
            &CONFIG,
        );
        prop_assert_eq!(&scoped_on_theirs, &whole);
    }
}

/// A container reported on a node of the scope whose row is on a node
/// outside it has a row: it is not adopted (the case the scope's rows
/// alone would get wrong).
#[test]
fn a_scoped_pass_does_not_adopt_a_container_whose_row_is_on_another_node() {
    let index = crate::pool::index::Index::from_rows(
        [row(1, "b", "demo", ContainerState::Idle, 900)],
        [],
        [],
    );
    let observed = BTreeMap::from([(
        node("a"),
        known(vec![observed(Some(cid(1)), "a", "demo", "h1", 900)]),
    )]);
    let scope = BTreeSet::from([node("a")]);
    let workloads = BTreeMap::from([(wl("demo"), "h1".to_owned())]);
    let mut d = Desired::gather(&index, workloads, Some(&scope));
    d.find_rows_elsewhere(&index, &observed);
    assert!(d.containers.is_empty());
    assert_eq!(d.rows_elsewhere, BTreeSet::from([cid(1)]));
    let actions = plan(&d, &observed, t(1000), &CONFIG);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a.kind, ActionKind::Adopt { .. })),
        "{actions:?}"
    );
}
