//! Placement and fill rules.

use super::*;
use crate::workload::parse_workload;
use proptest::prelude::*;

fn node(name: &str, cpus: f64, memory_gb: u64) -> NodeCandidate {
    NodeCandidate {
        id: NodeId::new(name).unwrap(),
        live: true,
        cordoned: false,
        labels: BTreeMap::new(),
        capacity: Resources {
            cpus,
            memory_bytes: memory_gb << 30,
            gpus: 0,
        },
        allocated: Resources::default(),
    }
}

#[test]
fn placement_prefers_free_capacity_and_respects_the_rules() {
    let w = parse_workload(
        "w",
        "id: w\nimage: i\ndeploy: {resources: {limits: {cpus: 1, memory: 1G}}}\n",
    )
    .unwrap();
    let mut nodes = vec![node("a", 4.0, 8), node("b", 4.0, 16), node("c", 8.0, 32)];
    assert_eq!(choose_node(&nodes, &w).unwrap().id.as_str(), "c");
    nodes[2].cordoned = true;
    assert_eq!(
        choose_node(&nodes, &w).unwrap().id.as_str(),
        "b",
        "cordoned nodes get nothing"
    );
    nodes[1].live = false;
    assert_eq!(
        choose_node(&nodes, &w).unwrap().id.as_str(),
        "a",
        "only live nodes"
    );
    nodes[0].allocated = Resources {
        cpus: 3.5,
        memory_bytes: 0,
        gpus: 0,
    };
    assert!(choose_node(&nodes, &w).is_none(), "no node has a free core");
}

#[test]
fn node_selectors_must_match_every_label() {
    let w = parse_workload(
        "w",
        "id: w\nimage: i\nnode_selector: {zone: b, gpu: 'yes'}\n",
    )
    .unwrap();
    let mut a = node("a", 4.0, 64);
    a.labels.insert("zone".into(), "b".into());
    let mut b = node("b", 4.0, 8);
    b.labels.insert("zone".into(), "b".into());
    b.labels.insert("gpu".into(), "yes".into());
    assert_eq!(choose_node(&[a, b], &w).unwrap().id.as_str(), "b");
}

#[test]
fn filling_respects_min_max_and_concurrency() {
    let c = |idle, warming, claimed| PoolCounts {
        idle,
        warming,
        claimed,
        ..Default::default()
    };
    assert_eq!(
        to_create(&c(0, 0, 0), 5, 10, 2),
        2,
        "fill_concurrency caps a round"
    );
    assert_eq!(
        to_create(&c(0, 2, 0), 5, 10, 2),
        0,
        "in-flight creates use the slots"
    );
    assert_eq!(to_create(&c(3, 1, 0), 5, 10, 4), 1);
    assert_eq!(to_create(&c(5, 0, 0), 5, 10, 4), 0, "full");
    assert_eq!(
        to_create(&c(0, 0, 9), 5, 10, 4),
        1,
        "max_size counts claimed ones"
    );
    assert_eq!(to_create(&c(0, 0, 10), 5, 10, 4), 0);
}

proptest! {
    /// Creating what to_create says never takes the pool past max_size,
    /// past fill_concurrency in flight, or past min_size idle+warming.
    #[test]
    fn to_create_never_overshoots(
        idle in 0u32..30, warming in 0u32..30, claimed in 0u32..30, reserved in 0u32..10,
        draining in 0u32..10, min in 0u32..40, extra in 0u32..40, conc in 1u32..10,
    ) {
        let max = (min + extra).max(1);
        let counts = PoolCounts { idle, warming, claimed, reserved, draining, lost: 0 };
        let n = to_create(&counts, min, max, conc);
        if n > 0 {
            prop_assert!(counts.total() + n <= max);
            prop_assert!(warming + n <= conc);
            prop_assert!(idle + warming + n <= min);
        }
    }

    #[test]
    fn states_round_trip(i in 0usize..6) {
        let s = ContainerState::ALL[i];
        prop_assert_eq!(s.as_str().parse::<ContainerState>().unwrap(), s);
    }
}

#[test]
fn a_pool_that_cannot_place_says_which_rule_excluded_the_nodes() {
    let w = parse_workload(
        "w",
        "id: w\nimage: i\ndeploy: {resources: {limits: {cpus: 0.5, memory: 1G}}}\nnode_selector: {zone: a}\n",
    )
    .unwrap();
    assert_eq!(why_no_node(&[], &w), "no node has joined");
    let mut nodes = vec![node("n1", 2.0, 8), node("n2", 2.0, 8)];
    for n in &mut nodes {
        n.live = false;
    }
    assert!(why_no_node(&nodes, &w).contains("none of the 2 node(s) is Ready"));
    for n in &mut nodes {
        n.live = true;
        n.cordoned = true;
    }
    assert!(why_no_node(&nodes, &w).contains("cordoned"));
    nodes[0].cordoned = false;
    assert_eq!(
        why_no_node(&nodes, &w),
        "no Ready node matches node_selector zone=a"
    );
    nodes[0].labels.insert("zone".into(), "a".into());
    nodes[0].allocated = Resources {
        cpus: 1.75,
        memory_bytes: 4 << 30,
        gpus: 0,
    };
    assert!(choose_node(&nodes, &w).is_none());
    let why = why_no_node(&nodes, &w);
    assert!(
        why.contains("needs 0.5 cpu") && why.contains("n1") && why.contains("0.25 cpu"),
        "{why}"
    );
}

fn counts(warming: u32, idle: u32, claimed: u32) -> PoolCounts {
    PoolCounts {
        warming,
        idle,
        claimed,
        ..Default::default()
    }
}

#[test]
fn a_rollout_warms_current_containers_before_stale_ones_go() {
    let stale = |idle, warming| Stale { idle, warming };
    // Two stale idle, nothing current: create two (fill_concurrency 2),
    // drain nothing yet.
    assert_eq!(roll(&counts(0, 2, 0), stale(2, 0), 2, 10, 2), (2, 0));
    // The replacements are warming: wait.
    assert_eq!(roll(&counts(2, 2, 0), stale(2, 0), 2, 10, 2), (0, 0));
    // They are idle: the stale ones go.
    assert_eq!(roll(&counts(0, 4, 0), stale(2, 0), 2, 10, 2), (0, 2));
    // At max_size with nothing current: one stale goes to make room.
    assert_eq!(roll(&counts(0, 3, 0), stale(3, 0), 2, 3, 2), (0, 1));
    // A stale warming container does not count as coming.
    assert_eq!(roll(&counts(1, 0, 0), stale(0, 1), 1, 10, 2), (1, 0));
    // Nothing stale: exactly to_create.
    assert_eq!(
        roll(&counts(0, 1, 3), Stale::default(), 2, 10, 2).0,
        to_create(&counts(0, 1, 3), 2, 10, 2)
    );
}

proptest! {
    #[test]
    fn a_rollout_never_empties_the_pool_nor_breaks_its_bounds(
        warming in 0u32..6, idle in 0u32..8, claimed in 0u32..6,
        stale_idle in 0u32..8, stale_warming in 0u32..6,
        min in 0u32..6, extra in 0u32..8, concurrency in 1u32..4,
    ) {
        let c = counts(warming, idle, claimed);
        let max = (min + extra).max(1);
        let s = Stale { idle: stale_idle.min(idle), warming: stale_warming.min(warming) };
        let (create, drain) = roll(&c, s, min, max, concurrency);
        prop_assert!(c.total() + create <= max.max(c.total()));
        prop_assert!(create <= concurrency.saturating_sub(warming));
        prop_assert!(drain <= s.idle);
        let current_idle = idle - s.idle;
        // Stale idle containers go only when current ones cover min_size,
        // or one at a time to make room at max_size.
        prop_assert!(drain == 0 || current_idle >= min || drain == 1);
        // The pool keeps idle containers it had unless current ones cover.
        if idle > 0 && current_idle < min {
            prop_assert!(idle - drain >= 1 || idle == 1 && drain == 1 && c.total() >= max);
        }
    }
}
