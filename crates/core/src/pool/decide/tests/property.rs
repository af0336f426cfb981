//! The property: whatever the interleaving of decisions made on stale
//! views, what commits keeps the index's rules.

use super::*;

#[derive(Debug, Clone)]
enum Op {
    Create {
        workload: u32,
        node: u32,
    },
    Promote {
        container: usize,
    },
    Claim {
        tenant: u32,
        workload: u32,
    },
    Release {
        tenant: u32,
        workload: u32,
        reserve: bool,
    },
    EndReservation {
        tenant: u32,
        workload: u32,
    },
    Drain {
        container: usize,
        scope: u8,
    },
    Removed {
        container: usize,
    },
    NodeLost {
        node: u32,
    },
    MarkLost {
        container: usize,
    },
    Resume {
        container: usize,
    },
    Adopt {
        container: usize,
        tenant: Option<u32>,
        last: Option<u32>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..2u32, 0..2u32).prop_map(|(workload, node)| Op::Create { workload, node }),
        (0..16usize).prop_map(|container| Op::Promote { container }),
        (0..4u32, 0..2u32).prop_map(|(tenant, workload)| Op::Claim { tenant, workload }),
        (0..4u32, 0..2u32, any::<bool>()).prop_map(|(tenant, workload, reserve)| Op::Release {
            tenant,
            workload,
            reserve
        }),
        (0..4u32, 0..2u32).prop_map(|(tenant, workload)| Op::EndReservation { tenant, workload }),
        (0..16usize, 0..3u8).prop_map(|(container, scope)| Op::Drain { container, scope }),
        (0..16usize).prop_map(|container| Op::Removed { container }),
        (0..2u32).prop_map(|node| Op::NodeLost { node }),
        (0..16usize).prop_map(|container| Op::MarkLost { container }),
        (0..16usize).prop_map(|container| Op::Resume { container }),
        (
            0..16usize,
            proptest::option::of(0..4u32),
            proptest::option::of(0..4u32)
        )
            .prop_map(|(container, tenant, last)| Op::Adopt {
                container,
                tenant,
                last
            }),
    ]
}

/// Decides `op` on `view`. Containers are named by their creation order.
fn decide(
    view: &Index,
    op: &Op,
    created: &[ContainerRecord],
    history: &BTreeMap<ContainerId, BTreeSet<TenantId>>,
    step: u64,
) -> Option<PoolWrite> {
    let now = at(1_000 + step as i64);
    let nth = |i: usize| created.get(i % created.len().max(1)).map(|c| c.id);
    match op {
        Op::Create { workload, node: n } => {
            let mut c = record(u128::from(step as u32) + 1_000, &w(*workload), &node(*n));
            c.created_at = now;
            Some(insert(c))
        }
        Op::Promote { container } => promote(view, &nth(*container)?, now),
        Op::Claim { tenant, workload } => {
            match choose(view, &t(*tenant), &w(*workload), "h", |_| false, live).ok()? {
                Choice::Existing(..) | Choice::Cold(_) => None,
                Choice::Affinity(r, c) => grant(
                    view,
                    &t(*tenant),
                    &c,
                    ClaimSource::Affinity,
                    Some(&r),
                    None,
                    format!("c{step}"),
                    now,
                )
                .ok()
                .map(|g| g.0),
                Choice::Pool(c, s) => grant(
                    view,
                    &t(*tenant),
                    &c,
                    ClaimSource::Pool,
                    None,
                    s.as_ref(),
                    format!("c{step}"),
                    now,
                )
                .ok()
                .map(|g| g.0),
            }
        }
        Op::Release {
            tenant,
            workload,
            reserve,
        } => {
            let after = if *reserve {
                AfterRelease::Reserve {
                    until: now.saturating_add(Duration::from_secs(60)),
                }
            } else {
                AfterRelease::Destroy
            };
            release(view, &t(*tenant), &w(*workload), None, after, "r", now)
                .ok()
                .map(|r| r.write)
        }
        Op::EndReservation { tenant, workload } => end_reservation(
            view,
            &t(*tenant),
            &w(*workload),
            ReservationEnd::Expired,
            now,
        )
        .ok()
        .map(|r| r.0),
        Op::Drain { container, scope } => {
            let scope =
                [DrainScope::Unowned, DrainScope::Unclaimed, DrainScope::Any][*scope as usize];
            drain(view, &nth(*container)?, scope, "r", now)
                .ok()
                .flatten()
        }
        Op::Removed { container } => removed(view, &nth(*container)?, now),
        Op::NodeLost { node: n } => node_lost(view, &node(*n), "r", |_| false, |_| true, now),
        Op::MarkLost { container } => mark_lost(view, &nth(*container)?, "r", now),
        Op::Resume { container } => {
            resume(view, &nth(*container)?, true, "r", format!("c{step}"), now).map(|r| r.0)
        }
        Op::Adopt {
            container,
            tenant,
            last,
        } => {
            let base = created.get(*container % created.len().max(1))?.clone();
            // A state file names the tenant that really held the container,
            // or nobody when its write was lost; the history is what the
            // claims table remembers.
            let known = history.get(&base.id).and_then(|s| s.first().cloned());
            let only = tenant.or(*last).unwrap_or(0);
            let name = |_: u32| known.clone().unwrap_or_else(|| t(only));
            let state = StateFile {
                tenant_id: tenant.map(name),
                last_tenant_id: last.map(name),
                claim_generation: u64::from(tenant.is_some() || last.is_some()),
                ..Default::default()
            };
            let prior = known.as_ref().map(|k| (k, 1));
            adopt(
                view,
                base,
                true,
                &state,
                prior,
                format!("c{step}"),
                "r",
                now,
            )
            .map(|r| r.0)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Decisions made on views up to three steps stale, committed only when
    /// admitted, keep every rule of a committed state; a rebuild from the
    /// rows equals memory; no container ever has two tenants.
    #[test]
    fn committed_state_keeps_the_rules_under_stale_decisions(
        ops in proptest::collection::vec((op(), 0..4usize), 1..120)
    ) {
        let mut index = Index::default();
        let mut views: Vec<Index> = vec![index.clone()];
        let mut created: Vec<ContainerRecord> = Vec::new();
        let mut tenants_of: BTreeMap<ContainerId, BTreeSet<TenantId>> = BTreeMap::new();
        for (step, (op, staleness)) in ops.iter().enumerate() {
            let view = &views[views.len().saturating_sub(1 + staleness)];
            let Some(write) = decide(view, op, &created, &tenants_of, step as u64) else { continue };
            // Adoption of a container that exists, by a stale view, is a conflict.
            if !commit(&mut index, &write) {
                continue;
            }
            for change in &write.containers {
                if let crate::pool::write::ContainerChange::Insert(c) = change
                    && !created.iter().any(|x| x.id == c.id)
                {
                    created.push(c.clone());
                }
            }
            let broken = index.check();
            prop_assert!(broken.is_empty(), "step {step} {op:?}: {broken:?}");
            let rebuilt = Index::from_rows(
                index.containers().cloned(),
                index.claims().cloned(),
                index.reservations().cloned(),
            );
            prop_assert_eq!(&rebuilt, &index);
            for c in index.containers() {
                let seen = tenants_of.entry(c.id).or_default();
                seen.extend(c.tenant_id.iter().chain(c.last_tenant_id.iter()).cloned());
                prop_assert!(seen.len() <= 1, "container {} served {seen:?}", c.id);
            }
            for claim in index.claims() {
                prop_assert_eq!(claim.status, ClaimStatus::Active);
                let seen = tenants_of.entry(claim.container_id).or_default();
                seen.insert(claim.tenant_id.clone());
                prop_assert!(seen.len() <= 1, "container {} served {seen:?}", claim.container_id);
            }
            views.push(index.clone());
            if views.len() > 4 {
                views.remove(0);
            }
        }
    }
}
