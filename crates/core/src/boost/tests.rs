use super::*;
use proptest::prelude::*;
use uuid::Uuid;

fn node_id(name: &str) -> NodeId {
    NodeId::new(name).unwrap()
}

fn ledger(name: &str, cpus: f64, allocated_cpus: f64) -> NodeLedger {
    NodeLedger {
        id: node_id(name),
        capacity: Resources {
            cpus,
            memory_bytes: 8 << 30,
            gpus: 2,
        },
        allocated: Resources {
            cpus: allocated_cpus,
            memory_bytes: 0,
            gpus: 0,
        },
        live: true,
    }
}

fn boost(n: u128, source: &str, amount: f64, priority: BoostPriority, requested_ms: i64) -> Boost {
    Boost {
        id: BoostId::from_uuid(Uuid::from_u128(n)),
        target: BoostTarget::Container(ContainerId::from_uuid(Uuid::from_u128(1000 + n))),
        container_id: Some(ContainerId::from_uuid(Uuid::from_u128(1000 + n))),
        resource: BoostResource::Cpu,
        amount,
        priority,
        source_node: node_id(source),
        status: BoostStatus::Active,
        reason: String::new(),
        requested_at: Timestamp::from_millis(requested_ms),
        allocated_at: Some(Timestamp::from_millis(requested_ms)),
        expires_at: Timestamp::from_millis(requested_ms + 3_600_000),
        ended_at: None,
    }
}

fn container_ask(node: &str, amount: f64, priority: BoostPriority) -> BoostAsk {
    BoostAsk {
        target: ResolvedTarget::Container {
            id: ContainerId::from_uuid(Uuid::from_u128(77)),
            node: node_id(node),
        },
        resource: BoostResource::Cpu,
        amount,
        priority,
        source: None,
    }
}

#[test]
fn amounts_are_validated_per_resource() {
    use BoostResource::*;
    assert!(Cpu.validate_amount(0.5).is_ok());
    assert!(Cpu.validate_amount(0.0).is_err());
    assert!(Cpu.validate_amount(-1.0).is_err());
    assert!(Cpu.validate_amount(f64::NAN).is_err());
    assert!(Cpu.validate_amount(f64::INFINITY).is_err());
    assert!(Cpu.validate_amount(1e9).is_err());
    assert!(Cpu.validate_amount(0.0001).is_err());
    assert!(Memory.validate_amount((512u64 << 20) as f64).is_ok());
    assert!(Memory.validate_amount(1.5).is_err());
    assert!(Memory.validate_amount(1024.0).is_err());
    assert!(Memory.validate_amount(1e18).is_err());
    assert!(Gpu.validate_amount(1.0).is_ok());
    assert!(Gpu.validate_amount(0.5).is_err());
    assert!(Gpu.validate_amount(1000.0).is_err());
    assert!("disk".parse::<BoostResource>().is_err());
    assert_eq!("CPU".parse::<BoostResource>(), Ok(Cpu));
}

#[test]
fn priorities_are_ordered_and_statuses_round_trip() {
    assert!(BoostPriority::Low < BoostPriority::Normal);
    assert!(BoostPriority::High < BoostPriority::Critical);
    for s in [
        BoostStatus::Pending,
        BoostStatus::Active,
        BoostStatus::Released,
        BoostStatus::Expired,
        BoostStatus::Preempted,
        BoostStatus::Failed,
    ] {
        assert_eq!(s.as_str().parse::<BoostStatus>(), Ok(s));
    }
    assert!(BoostStatus::Pending.is_live() && BoostStatus::Active.is_live());
    assert!(!BoostStatus::Expired.is_live());
}

#[test]
fn a_boost_that_fits_preempts_nothing() {
    let nodes = [ledger("a", 4.0, 1.0)];
    let live = [boost(1, "a", 1.0, BoostPriority::Low, 0)];
    let admission = admit(
        &container_ask("a", 2.0, BoostPriority::Normal),
        &nodes,
        &live,
    )
    .unwrap();
    assert_eq!(admission.source, node_id("a"));
    assert!(admission.preempt.is_empty());
}

#[test]
fn preemption_takes_lowest_priority_first_then_newest() {
    let nodes = [ledger("a", 4.0, 0.0)];
    let live = [
        boost(1, "a", 1.0, BoostPriority::Normal, 10),
        boost(2, "a", 1.0, BoostPriority::Low, 10),
        boost(3, "a", 1.0, BoostPriority::Low, 20),
        boost(4, "a", 1.0, BoostPriority::High, 30),
    ];
    // Free is 0; 1.5 needs two boosts: both lows, the newer first.
    let admission = admit(
        &container_ask("a", 1.5, BoostPriority::Critical),
        &nodes,
        &live,
    )
    .unwrap();
    assert_eq!(admission.preempt, vec![live[2].id, live[1].id]);
    // A high boost may take lows and the normal, never the other high.
    let admission = admit(&container_ask("a", 3.0, BoostPriority::High), &nodes, &live).unwrap();
    assert_eq!(admission.preempt, vec![live[2].id, live[1].id, live[0].id]);
    let err = admit(&container_ask("a", 3.5, BoostPriority::High), &nodes, &live).unwrap_err();
    assert!(
        matches!(err, AdmitError::Short { preemptible, .. } if (preemptible - 3.0).abs() < 1e-9)
    );
}

#[test]
fn equal_priority_is_never_preempted() {
    let nodes = [ledger("a", 2.0, 0.0)];
    let live = [boost(1, "a", 2.0, BoostPriority::Normal, 0)];
    let err = admit(
        &container_ask("a", 1.0, BoostPriority::Normal),
        &nodes,
        &live,
    )
    .unwrap_err();
    assert!(matches!(err, AdmitError::Short { free, .. } if free.abs() < 1e-9));
}

#[test]
fn sources_are_chosen_by_the_rules() {
    let nodes = [
        ledger("a", 4.0, 3.0),
        ledger("b", 4.0, 1.0),
        ledger("c", 8.0, 0.0),
    ];
    // A node boost draws from the other node with the most free.
    let ask = BoostAsk {
        target: ResolvedTarget::Node(node_id("c")),
        resource: BoostResource::Cpu,
        amount: 1.0,
        priority: BoostPriority::Normal,
        source: None,
    };
    assert_eq!(admit(&ask, &nodes, &[]).unwrap().source, node_id("b"));
    let to_self = BoostAsk {
        source: Some(node_id("c")),
        ..ask.clone()
    };
    assert_eq!(
        admit(&to_self, &nodes, &[]),
        Err(AdmitError::SourceIsTarget(node_id("c")))
    );
    let unknown = BoostAsk {
        source: Some(node_id("zz")),
        ..ask.clone()
    };
    assert_eq!(
        admit(&unknown, &nodes, &[]),
        Err(AdmitError::UnknownSource(node_id("zz")))
    );
    // A lone node has nobody to draw from.
    assert!(matches!(
        admit(&ask, &nodes[2..], &[]),
        Err(AdmitError::NoSource(..))
    ));
    // A container boost draws from its own node, and only from it.
    let mut on_a = container_ask("a", 0.5, BoostPriority::Normal);
    assert_eq!(admit(&on_a, &nodes, &[]).unwrap().source, node_id("a"));
    on_a.source = Some(node_id("b"));
    assert!(matches!(
        admit(&on_a, &nodes, &[]),
        Err(AdmitError::SourceNotContainerNode { .. })
    ));
}

#[test]
fn node_boosts_move_capacity_between_nodes() {
    let mut b = boost(1, "a", 1.5, BoostPriority::Normal, 0);
    b.target = BoostTarget::Node(node_id("b"));
    b.container_id = None;
    let live = [b];
    let cap = Resources {
        cpus: 4.0,
        memory_bytes: 1 << 30,
        gpus: 1,
    };
    assert!((effective_capacity(&node_id("a"), cap, &live).cpus - 2.5).abs() < 1e-9);
    assert!((effective_capacity(&node_id("b"), cap, &live).cpus - 5.5).abs() < 1e-9);
    assert_eq!(
        effective_capacity(&node_id("b"), cap, &live).memory_bytes,
        1 << 30
    );
    // Ended boosts count for nothing.
    let mut ended = live[0].clone();
    ended.end(
        BoostStatus::Expired,
        "time is up",
        Timestamp::from_millis(5),
    );
    assert_eq!(effective_capacity(&node_id("a"), cap, &[ended]), cap);
}

#[test]
fn container_limits_rise_by_live_boosts_only() {
    let mut a = boost(1, "a", 0.5, BoostPriority::Normal, 0);
    let mut m = boost(2, "a", (64u64 << 20) as f64, BoostPriority::Normal, 0);
    m.resource = BoostResource::Memory;
    m.container_id = a.container_id;
    let container = a.container_id.unwrap();
    let base = Limits {
        cpus: Some(0.25),
        memory_bytes: Some(64 << 20),
    };
    let raised = boosted_limits(&base, &container, &[a.clone(), m.clone()]);
    assert!(limits_match(
        &raised,
        &Limits {
            cpus: Some(0.75),
            memory_bytes: Some(128 << 20)
        }
    ));
    a.end(
        BoostStatus::Released,
        "by operator",
        Timestamp::from_millis(1),
    );
    m.end(BoostStatus::Preempted, "by b", Timestamp::from_millis(1));
    assert!(limits_match(
        &boosted_limits(&base, &container, &[a, m]),
        &base
    ));
    // Unset limits stay unset: there is nothing to raise.
    let unlimited = Limits::default();
    let b = boost(3, "a", 1.0, BoostPriority::Low, 0);
    assert_eq!(
        boosted_limits(&unlimited, &b.container_id.unwrap(), &[b]),
        unlimited
    );
}

#[test]
fn expiry_and_activation_keep_the_duration_asked_for() {
    let mut b = boost(1, "a", 1.0, BoostPriority::Normal, 1_000);
    b.status = BoostStatus::Pending;
    b.allocated_at = None;
    b.expires_at = Timestamp::from_millis(1_000 + 60_000);
    assert!(due(std::slice::from_ref(&b), Timestamp::from_millis(70_000)).is_empty());
    b.activate(Timestamp::from_millis(3_000));
    assert_eq!(b.expires_at, Timestamp::from_millis(63_000));
    assert_eq!(b.duration(), Duration::from_secs(60));
    assert_eq!(
        b.remaining(Timestamp::from_millis(13_000)),
        Some(Duration::from_secs(50))
    );
    assert!(due(std::slice::from_ref(&b), Timestamp::from_millis(62_999)).is_empty());
    assert_eq!(
        due(std::slice::from_ref(&b), Timestamp::from_millis(63_000)),
        vec![b.id]
    );
    assert_eq!(next_expiry(std::slice::from_ref(&b)), Some(b.expires_at));
    b.end(
        BoostStatus::Expired,
        "time is up",
        Timestamp::from_millis(63_000),
    );
    assert_eq!(b.remaining(Timestamp::from_millis(63_000)), None);
    assert_eq!(next_expiry(&[b]), None);
}

fn priority() -> impl Strategy<Value = BoostPriority> {
    prop_oneof![
        Just(BoostPriority::Low),
        Just(BoostPriority::Normal),
        Just(BoostPriority::High),
        Just(BoostPriority::Critical),
    ]
}

proptest! {
    /// Admission never overcommits the source, preempts only lower
    /// priorities, and refuses only when even preempting all of them
    /// would not make room.
    #[test]
    fn admission_never_overcommits(
        capacity in 1.0f64..16.0,
        allocated in 0.0f64..8.0,
        existing in proptest::collection::vec((0.1f64..4.0, priority(), 0i64..1000), 0..12),
        amount in 0.1f64..8.0,
        asked in priority(),
    ) {
        let nodes = [ledger("a", capacity, allocated.min(capacity))];
        // Only boosts that fit were ever admitted.
        let mut live: Vec<Boost> = Vec::new();
        for (i, (amt, p, at)) in existing.iter().enumerate() {
            if free(&nodes[0], BoostResource::Cpu, &live) + 1e-9 >= *amt {
                live.push(boost(i as u128 + 1, "a", *amt, *p, *at));
            }
        }
        match admit(&container_ask("a", amount, asked), &nodes, &live) {
            Ok(admission) => {
                let mut after: Vec<Boost> = live
                    .iter()
                    .filter(|b| !admission.preempt.contains(&b.id))
                    .cloned()
                    .collect();
                let mut new = boost(999, "a", amount, asked, 5000);
                new.status = BoostStatus::Pending;
                after.push(new);
                prop_assert!(free(&nodes[0], BoostResource::Cpu, &after) >= -1e-6);
                for id in &admission.preempt {
                    let b = live.iter().find(|b| &b.id == id).unwrap();
                    prop_assert!(b.priority < asked);
                }
                // Preempting one fewer would not have been enough.
                if let Some(last) = admission.preempt.last() {
                    let mut fewer = after.clone();
                    fewer.push(live.iter().find(|b| &b.id == last).unwrap().clone());
                    prop_assert!(free(&nodes[0], BoostResource::Cpu, &fewer) < -1e-9);
                }
            }
            Err(AdmitError::Short { .. }) => {
                let lower: f64 = live.iter().filter(|b| b.priority < asked).map(|b| b.amount).sum();
                prop_assert!(free(&nodes[0], BoostResource::Cpu, &live) + lower < amount + 1e-6);
            }
            Err(other) => prop_assert!(false, "unexpected {other}"),
        }
    }
}
