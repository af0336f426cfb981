//! A deterministic, seeded simulation of the pool state machine hunting
//! for double assignment, lost acknowledgements and memory that drifts
//! from the database.
//!
//! It runs the server's real pieces: the store on a real SQLite file, its
//! conditional writes, the index mirrored from the commit hook, and the
//! `core::pool::decide` rules, driven by random interleavings of claims,
//! releases, touches, expiries, idle reaping, destroys, pool
//! reconfiguration, node loss and return, engine destroys, stale and
//! incomplete reports, reconciliation, server restarts, decisions that
//! commit after others (concurrent handlers, and handlers that run on
//! after their client left), and clients that retry with a request id.
//! After every step it checks the invariants in [`check`].
//!
//! Every failure names its seed; `BOILERHOUSE_SIM_SEED=<seed>` replays
//! exactly that schedule. `BOILERHOUSE_SIM_SCHEDULES=<n>` runs longer.

mod infra;
mod ops;
mod scenarios;
mod world;

use std::collections::BTreeSet;
use std::time::Duration;

use boilerhouse_core::pool::ContainerState;
use rand::Rng;

use world::World;

/// Steps per schedule.
const STEPS: u64 = 150;

/// One random step.
async fn step(w: &mut World) {
    w.stats.steps += 1;
    // A real clock: no two steps share a millisecond.
    w.advance(Duration::from_millis(1));
    match w.rng.random_range(0..100) {
        0..=21 => w.claim().await,
        22..=31 => w.release().await,
        32..=35 => w.touch().await,
        36..=47 => w.commit_pending().await,
        48..=52 => w.cold_ready().await,
        53..=57 => w.refill().await,
        58..=60 => w.expire_reservations().await,
        61..=62 => w.reap_idle().await,
        63..=64 => w.extend_or_revoke().await,
        65..=66 => w.destroy().await,
        67 => w.reconfigure().await,
        68..=70 => w.flip_node().await,
        71..=72 => w.engine_destroy().await,
        73..=77 => w.send_report(),
        78..=81 => w.deliver(),
        82..=86 => w.reconcile().await,
        87..=88 => w.restart().await,
        89..=90 => w.retry_answered().await,
        91..=92 => w.unhealthy().await,
        _ => {
            let by = Duration::from_millis(w.rng.random_range(100..8_000));
            w.advance(by);
        }
    }
}

/// The invariants, after every step.
async fn check(w: &mut World) {
    let seed = w.seed;
    let anomalies = std::mem::take(&mut *w.anomalies.lock().unwrap());
    assert!(
        anomalies.is_empty(),
        "seed {seed}: committed writes did not fit memory: {anomalies:?}"
    );
    let index = w.index();
    let broken = index.check();
    assert!(
        broken.is_empty(),
        "seed {seed}: the index breaks its rules: {broken:?}\n{}\nindex: {index:#?}",
        w.trace.join("\n")
    );
    // Memory equals the committed rows.
    let rows = w
        .store
        .load_pool_snapshot()
        .await
        .expect("load the pool rows");
    let from_rows = boilerhouse_core::pool::index::Index::from_rows(
        rows.containers,
        rows.claims,
        rows.reservations,
    );
    // PostgreSQL: a standby that reads the change feed now holds exactly
    // the committed rows (every few steps, so that its reads are deltas
    // of varied sizes).
    if w.stats.steps.is_multiple_of(5)
        && let Some(warm) = w.standby_rows().await
    {
        assert!(
            warm == from_rows,
            "seed {seed}: the standby's warm copy differs from the committed rows\nwarm: {warm:#?}\nrows: {from_rows:#?}\n{}",
            w.trace.join("\n")
        );
    }
    if from_rows != index {
        let mut diff = Vec::new();
        let ids: BTreeSet<_> = index
            .containers()
            .chain(from_rows.containers())
            .map(|c| c.id)
            .collect();
        for id in ids {
            let (m, d) = (index.container(&id), from_rows.container(&id));
            if m != d {
                diff.push(format!("container {id}:\n  memory {m:?}\n  rows   {d:?}"));
            }
        }
        let claims =
            |i: &boilerhouse_core::pool::index::Index| i.claims().cloned().collect::<Vec<_>>();
        if claims(&index) != claims(&from_rows) {
            diff.push(format!(
                "claims:\n  memory {:?}\n  rows   {:?}",
                claims(&index),
                claims(&from_rows)
            ));
        }
        let res = |i: &boilerhouse_core::pool::index::Index| {
            i.reservations().cloned().collect::<Vec<_>>()
        };
        if res(&index) != res(&from_rows) {
            diff.push(format!(
                "reservations:\n  memory {:?}\n  rows   {:?}",
                res(&index),
                res(&from_rows)
            ));
        }
        panic!(
            "seed {seed}: the index differs from the committed rows\n{}\n{}",
            diff.join("\n"),
            w.trace.join("\n")
        );
    }
    // No container ever passes from one tenant to another.
    for c in index.containers() {
        let mut tenants: BTreeSet<_> = c
            .tenant_id
            .iter()
            .chain(c.last_tenant_id.iter())
            .cloned()
            .collect();
        tenants.extend(index.claim_on(&c.id).map(|cl| cl.tenant_id.clone()));
        tenants.extend(index.reservation_on(&c.id).map(|r| r.tenant_id.clone()));
        let seen = w.history.entry(c.id).or_default();
        seen.extend(tenants);
        assert!(
            seen.len() <= 1,
            "seed {seed}: container {} has served {seen:?}",
            c.id
        );
        if !seen.is_empty() {
            assert!(
                !matches!(c.state, ContainerState::Idle | ContainerState::Warming),
                "seed {seed}: container {} served {seen:?} and is {} again\n{}",
                c.id,
                c.state,
                w.trace.join("\n")
            );
        }
        // Fencing tokens only grow.
        let top = w.generations.entry(c.id).or_default();
        assert!(
            c.claim_generation >= *top,
            "seed {seed}: container {} went back from generation {top} to {}",
            c.id,
            c.claim_generation
        );
        *top = c.claim_generation;
    }
    // A fencing token is never handed out twice: each new claim on a
    // container has a generation above every earlier claim's.
    for claim in index.claims() {
        let seen = w.claims_seen.entry(claim.container_id).or_default();
        if !seen.contains_key(&claim.claim_id) {
            let top = seen.values().copied().max().unwrap_or(0);
            assert!(
                claim.generation > top,
                "seed {seed}: claim {} of {} on {} has generation {} but an earlier claim had {top}",
                claim.claim_id,
                claim.tenant_id,
                claim.container_id,
                claim.generation
            );
            seen.insert(claim.claim_id.clone(), claim.generation);
        }
    }
    // Hosts never run a container for a tenant other than the one its
    // history names.
    for host in w.hosts.values() {
        for (id, c) in &host.containers {
            if let Some(t) = &c.state_file.tenant_id {
                let seen = w.history.entry(*id).or_default();
                seen.insert(t.clone());
                assert!(
                    seen.len() <= 1,
                    "seed {seed}: host container {id} has state for {seen:?}"
                );
            }
        }
    }
}

/// Drives every pending thing to rest: nodes up, decisions committed,
/// creates made, removals done, reports fresh, reconciliation past its
/// graces. Then nothing may be stuck.
async fn settle(w: &mut World) {
    w.settling = true;
    w.note("settling");
    let nodes: Vec<_> = w.hosts.keys().cloned().collect();
    for n in &nodes {
        let host = w.hosts.get_mut(n).unwrap();
        if !host.up {
            host.up = true;
        }
    }
    for _ in 0..12 {
        while !w.pending.is_empty() {
            w.commit_pending().await;
            check(w).await;
        }
        while !w.warming_for.is_empty() {
            w.cold_ready().await;
            check(w).await;
        }
        for n in &nodes {
            w.deliver_state_files(n, usize::MAX);
            w.report(n, false);
        }
        w.advance(Duration::from_secs(30));
        w.reconcile().await;
        check(w).await;
        w.refill().await;
        check(w).await;
    }
    // Creates the last round started are made now.
    w.refill().await;
    check(w).await;
    let index = w.index();
    // Nothing leaks: every row's container exists, every host container
    // has a row, nothing is left half-way.
    for c in index.containers() {
        let on_host = w.hosts[&c.node_id].containers.contains_key(&c.id);
        assert!(
            on_host || c.state == ContainerState::Draining,
            "seed {}: row {} ({}) has no container after settling\n{}",
            w.seed,
            c.id,
            c.state,
            w.trace.join("\n")
        );
        assert!(
            c.state != ContainerState::Lost,
            "seed {}: container {} is still lost with every node up",
            w.seed,
            c.id
        );
    }
    for (node, host) in &w.hosts {
        for id in host.containers.keys() {
            assert!(
                index.container(id).is_some(),
                "seed {}: container {id} runs on {node} with no row after settling\n{}",
                w.seed,
                w.trace.join("\n")
            );
        }
    }
    w.restart().await;
    check(w).await;
}

/// One schedule. `scoped`: half the reconcile passes cover some nodes
/// only (see `World::reconcile`); off, every pass is whole, as when the
/// pinned seeds below found their defects.
async fn run(seed: u64, scoped: bool) -> world::Stats {
    let mut w = World::new(seed).await;
    w.scoped_passes = scoped;
    for _ in 0..STEPS {
        step(&mut w).await;
        check(&mut w).await;
    }
    settle(&mut w).await;
    w.stats
}

/// Schedules per run: 2,000 on SQLite; 200 on PostgreSQL, where every
/// commit is a network round trip and each schedule's schema is made and
/// migrated anew (the PostgreSQL pass checks that the store keeps the same
/// promises there; the search for new schedules is SQLite's pass).
fn schedules() -> u64 {
    let default = match boilerhouse_testkit::database::backend() {
        boilerhouse_testkit::database::TestBackend::Sqlite => 2000,
        boilerhouse_testkit::database::TestBackend::Postgres => 200,
    };
    std::env::var("BOILERHOUSE_SIM_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Runs seeds `shard, shard + shards, ...` on a single-threaded runtime,
/// so that a seed replays exactly.
fn shard(shard: u64, shards: u64) {
    if let Some(seed) = std::env::var("BOILERHOUSE_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        if seed % shards == shard {
            replay(seed, true);
        }
        return;
    }
    let base: u64 = std::env::var("BOILERHOUSE_SIM_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut total = world::Stats::default();
    let mut count = 0;
    for seed in (base..base + schedules()).filter(|s| s % shards == shard) {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runtime.block_on(run(seed, true))
        }));
        match result {
            Ok(s) => {
                count += 1;
                total.steps += s.steps;
                total.commits += s.commits;
                total.conflicts += s.conflicts;
                total.claims += s.claims;
                total.releases += s.releases;
                total.restarts += s.restarts;
                total.node_losses += s.node_losses;
                total.adoptions += s.adoptions;
                total.resumes += s.resumes;
                total.replays += s.replays;
            }
            Err(e) => {
                eprintln!(
                    "simulation failed at seed {seed}; replay with BOILERHOUSE_SIM_SEED={seed}"
                );
                std::panic::resume_unwind(e);
            }
        }
    }
    println!("shard {shard}/{shards}: {count} schedules, {total:?}");
}

fn replay(seed: u64, scoped: bool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stats = runtime.block_on(run(seed, scoped));
    println!("seed {seed}: {stats:?}");
}

#[test]
fn simulation_shard_0() {
    shard(0, 4);
}

#[test]
fn simulation_shard_1() {
    shard(1, 4);
}

#[test]
fn simulation_shard_2() {
    shard(2, 4);
}

#[test]
fn simulation_shard_3() {
    shard(3, 4);
}

/// Seeds that once found a defect (see the scripted schedules and the
/// store's conditions), replayed on every run: 1003044 and 1001162 (a
/// claim and a reservation for one tenant), 3005674 (a stale adoption
/// reviving a used container), 5003823 (a claim decided on a row that was
/// removed and adopted again, identical but for its update time), 4 (on
/// PostgreSQL: a standby's warm copy dropped a container that was
/// removed and adopted again under its id between two of its reads).
#[test]
fn seeds_that_found_defects() {
    for seed in [1_003_044, 1_001_162, 3_005_674, 5_003_823, 4] {
        replay(seed, false);
    }
}
