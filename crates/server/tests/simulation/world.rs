//! The simulated world: the real store on a temporary SQLite file, the
//! pool index mirrored from its commits exactly as the server does it, and
//! a model of the hosts (containers, state files, reports).

use boilerhouse_testkit::database::TestDatabase;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boilerhouse_core::container::{ObservedContainer, StateFile, labels};
use boilerhouse_core::ids::Uuid;
use boilerhouse_core::pool::index::Index;
use boilerhouse_core::pool::write::PoolWrite;
use boilerhouse_core::pool::{ContainerRecord, ContainerState};
use boilerhouse_core::{ContainerId, NodeId, TenantId, Timestamp, WorkloadId};
use boilerhouse_server::store::{
    Backend, DatabaseLocation, Store, StoreError, StoreOptions, WarmPool, open_inspector,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Grace periods of reconciliation, in simulated time.
pub const LOST_GRACE: Duration = Duration::from_secs(10);
pub const CREATION_GRACE: Duration = Duration::from_secs(10);

/// A workload as the simulation configures it.
#[derive(Debug, Clone)]
pub struct Workload {
    pub id: WorkloadId,
    pub hash: String,
    pub min: u32,
    pub max: u32,
    pub reuse: bool,
    pub affinity: Duration,
    pub idle_timeout: Duration,
    pub configured: bool,
    pub drained: bool,
}

/// A container as its host has it.
#[derive(Debug, Clone)]
pub struct HostContainer {
    pub docker_id: String,
    pub workload: WorkloadId,
    pub hash: String,
    pub created_at: Timestamp,
    pub running: bool,
    pub state_file: StateFile,
}

/// One Docker host and its agent.
#[derive(Debug, Clone, Default)]
pub struct Host {
    /// Whether its agent is connected and heartbeating.
    pub up: bool,
    pub containers: BTreeMap<ContainerId, HostContainer>,
    /// The last full report the server holds, possibly behind the host.
    pub report: Option<(Timestamp, Vec<ObservedContainer>)>,
    /// State-file writes sent but not yet applied, in order.
    pub state_writes: Vec<(ContainerId, StateFile)>,
}

/// What a pending decision was for, so its commit is accounted for.
#[derive(Debug, Clone)]
pub enum Intent {
    Claim {
        tenant: TenantId,
        workload: WorkloadId,
        request_id: Option<String>,
    },
    Other(&'static str),
}

/// A decision made on the state as it was, to be committed later: the
/// simulation's model of concurrent operations and of handlers that run
/// on after their client left.
#[derive(Debug, Clone)]
pub struct Pending {
    pub write: PoolWrite,
    pub intent: Intent,
}

/// Counts for the closing note.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub steps: u64,
    pub commits: u64,
    pub conflicts: u64,
    pub claims: u64,
    pub releases: u64,
    pub restarts: u64,
    pub node_losses: u64,
    pub adoptions: u64,
    pub resumes: u64,
    pub replays: u64,
}

pub struct World {
    pub seed: u64,
    pub rng: StdRng,
    /// Which nodes a reconcile pass covers (every one, or a few as a
    /// node's first report is reconciled): a stream of its own.
    pub scope_rng: StdRng,
    /// Whether passes may be scoped at all.
    pub scoped_passes: bool,
    pub now: Timestamp,
    pub store: Store,
    /// SQLite, or a PostgreSQL schema when the run is on it.
    database: TestDatabase,
    /// The mirror, changed only by the commit hook.
    pub index: Arc<Mutex<Index>>,
    pub anomalies: Arc<Mutex<Vec<String>>>,
    pub hosts: BTreeMap<NodeId, Host>,
    pub workloads: BTreeMap<WorkloadId, Workload>,
    pub tenants: Vec<TenantId>,
    pub pending: Vec<Pending>,
    /// Containers a cold start owns while they warm (the server's busy
    /// set: in memory, gone with a restart).
    pub warming_for: BTreeMap<ContainerId, (TenantId, WorkloadId)>,
    /// Every tenant ever associated with each container.
    pub history: BTreeMap<ContainerId, BTreeSet<TenantId>>,
    /// The highest claim generation seen per container.
    pub generations: BTreeMap<ContainerId, u64>,
    /// Every claim seen per container: claim id and generation.
    pub claims_seen: BTreeMap<ContainerId, BTreeMap<String, u64>>,
    /// Claims answered to clients with a request id: (request id, claim id).
    pub answered: Vec<(String, TenantId, WorkloadId, String)>,
    pub stats: Stats,
    /// What happened, for a failure's replay.
    pub trace: Vec<String>,
    /// Set while settling: nothing is skipped at random any more.
    pub settling: bool,
    /// PostgreSQL: a standby's warm copy of the pool's rows, on a
    /// connection of its own, read from the change feed as a real standby
    /// reads it.
    pub standby: Option<(sqlx::AnyConnection, WarmPool)>,
    next: u64,
}

async fn open(database: &TestDatabase) -> Store {
    Store::open(
        DatabaseLocation::parse(database.value()).expect("a database location"),
        StoreOptions {
            synchronous_full: false,
            max_batch: 64,
            read_connections: 4,
            fence: None,
            ..StoreOptions::default()
        },
    )
    .await
    .expect("open the store")
}

async fn rebuild(store: &Store) -> Index {
    let s = store
        .load_pool_snapshot()
        .await
        .expect("load the pool rows");
    Index::from_rows(s.containers, s.claims, s.reservations)
}

impl World {
    pub async fn new(seed: u64) -> Self {
        let database = TestDatabase::fresh().await.expect("a test database");
        let store = open(&database).await;
        let standby = match store.backend() {
            Backend::Postgres => Some((
                open_inspector(store.location())
                    .await
                    .expect("a standby's connection"),
                WarmPool::default(),
            )),
            Backend::Sqlite => None,
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let nodes = rng.random_range(1..=3);
        let hosts = (0..nodes)
            .map(|i| {
                (
                    NodeId::new(format!("node-{i}")).unwrap(),
                    Host {
                        up: true,
                        ..Default::default()
                    },
                )
            })
            .collect();
        let mut workloads = BTreeMap::new();
        for i in 0..rng.random_range(1..=2) {
            let id = WorkloadId::new(format!("w{i}")).unwrap();
            let max = rng.random_range(1..=4);
            workloads.insert(
                id.clone(),
                Workload {
                    id,
                    hash: "h1".into(),
                    min: rng.random_range(0..=max.min(2)),
                    max,
                    reuse: rng.random_bool(0.7),
                    affinity: Duration::from_secs(rng.random_range(5..=60)),
                    idle_timeout: Duration::from_secs(rng.random_range(20..=120)),
                    configured: true,
                    drained: false,
                },
            );
        }
        let tenants = (0..rng.random_range(2..=5))
            .map(|i| TenantId::new(format!("t{i}")).unwrap())
            .collect();
        Self {
            seed,
            rng,
            scope_rng: StdRng::seed_from_u64(seed ^ 0x5c0e_5c0e_5c0e_5c0e),
            scoped_passes: true,
            now: Timestamp::from_millis(1_700_000_000_000),
            store,
            database,
            index: Arc::default(),
            anomalies: Arc::default(),
            hosts,
            workloads,
            tenants,
            pending: Vec::new(),
            warming_for: BTreeMap::new(),
            history: BTreeMap::new(),
            generations: BTreeMap::new(),
            claims_seen: BTreeMap::new(),
            answered: Vec::new(),
            stats: Stats::default(),
            trace: Vec::new(),
            settling: false,
            standby,
            next: 0,
        }
    }

    pub fn note(&mut self, what: impl Into<String>) {
        let what = what.into();
        self.trace.push(format!("[{}] {what}", self.stats.steps));
    }

    /// A deterministic fresh id.
    pub fn uuid(&mut self) -> Uuid {
        self.next += 1;
        Uuid::from_u64_pair(self.rng.random(), self.next)
    }

    pub fn index(&self) -> Index {
        self.index.lock().unwrap().clone()
    }

    pub fn read<T>(&self, f: impl FnOnce(&Index) -> T) -> T {
        f(&self.index.lock().unwrap())
    }

    pub fn advance(&mut self, by: Duration) {
        self.now = self.now.saturating_add(by);
    }

    /// Commits as the server does: the index applies the write on the
    /// store's writer task, right after the commit.
    pub async fn commit(&mut self, write: PoolWrite) -> Result<(), StoreError> {
        let index = self.index.clone();
        let anomalies = self.anomalies.clone();
        let result = self
            .store
            .commit_pool_write(write.clone(), move |committed| {
                let found = index.lock().unwrap().apply(committed);
                anomalies
                    .lock()
                    .unwrap()
                    .extend(found.into_iter().map(|a| a.0));
            })
            .await;
        match &result {
            Ok(()) => {
                self.stats.commits += 1;
                self.after_commit(&write);
            }
            Err(StoreError::Conflict(_)) => self.stats.conflicts += 1,
            Err(e) => panic!("seed {}: the store failed: {e}", self.seed),
        }
        result
    }

    /// The server's follow-ups of a commit: state files go to the hosts.
    fn after_commit(&mut self, write: &PoolWrite) {
        let index = self.index();
        for change in &write.containers {
            let Some(c) = index.container(&change.id()) else {
                continue;
            };
            if !matches!(c.state, ContainerState::Claimed | ContainerState::Reserved) {
                continue;
            }
            let state = StateFile {
                tenant_id: c.tenant_id.clone(),
                last_tenant_id: c.last_tenant_id.clone(),
                claimed_at: c.tenant_id.as_ref().map(|_| self.now),
                last_activity_at: Some(self.now),
                claim_generation: c.claim_generation,
            };
            if let Some(host) = self.hosts.get_mut(&c.node_id) {
                host.state_writes.push((c.id, state));
            }
        }
    }

    /// The server restarts: everything in memory is gone (decisions not
    /// committed, cold starts in flight); the index is rebuilt from the
    /// same file and must equal what it was.
    pub async fn restart(&mut self) {
        let before = self.index();
        self.store.close().await;
        self.store = open(&self.database).await;
        let after = rebuild(&self.store).await;
        assert_eq!(
            before, after,
            "seed {}: the index rebuilt after a restart differs from the one before",
            self.seed
        );
        // A failover: the standby's warm copy, caught up as an elected
        // server catches it up, makes the same index.
        if let Some((_, warm)) = &mut self.standby {
            let mut elected = std::mem::take(warm);
            self.store
                .catch_up(&mut elected)
                .await
                .expect("catch the warm copy up");
            assert_eq!(
                &before,
                elected.index(),
                "seed {}: the index an elected standby built from its warm copy differs",
                self.seed
            );
            *warm = elected;
        }
        *self.index.lock().unwrap() = after;
        self.pending.clear();
        self.warming_for.clear();
        for host in self.hosts.values_mut() {
            // Sessions end with the server; reports come again.
            host.report = None;
        }
        self.stats.restarts += 1;
    }

    /// The standby reads the change feed (PostgreSQL): the rows its warm
    /// copy then holds, or `None` on SQLite.
    pub async fn standby_rows(&mut self) -> Option<Index> {
        let (conn, warm) = self.standby.as_mut()?;
        warm.refresh(conn).await.expect("read the change feed");
        Some(warm.index().clone())
    }

    /// A random skip, never while settling.
    pub fn skip(&mut self, p: f64) -> bool {
        !self.settling && self.rng.random_bool(p)
    }

    /// Whether the server would offer containers of `node`.
    pub fn live(&self, node: &NodeId) -> bool {
        self.hosts.get(node).is_some_and(|h| h.up)
    }

    /// A fresh full report of `node`, possibly missing a container (an
    /// engine listing that raced a restart).
    pub fn report(&mut self, node: &NodeId, omit_some: bool) {
        let now = self.now;
        let omit = omit_some && self.rng.random_bool(0.5);
        let pick = self.rng.random::<u32>();
        let host = self.hosts.get_mut(node).unwrap();
        let n = host.containers.len();
        let containers = host
            .containers
            .iter()
            .enumerate()
            .filter(|(i, _)| !(omit && n > 0 && *i == pick as usize % n))
            .map(|(_, (id, c))| observed(node, id, c))
            .collect();
        host.report = Some((now, containers));
    }

    /// Applies the oldest `n` state-file writes a host has pending.
    pub fn deliver_state_files(&mut self, node: &NodeId, n: usize) {
        let host = self.hosts.get_mut(node).unwrap();
        let n = n.min(host.state_writes.len());
        for (id, state) in host.state_writes.drain(..n).collect::<Vec<_>>() {
            if let Some(c) = host.containers.get_mut(&id) {
                c.state_file = state;
            }
        }
    }

    /// A container the host runs from now on.
    pub fn host_create(&mut self, c: &ContainerRecord) -> String {
        let docker_id = format!("d{}", self.uuid().simple());
        let wl = self.workloads.get(&c.workload_id).unwrap();
        let made = HostContainer {
            docker_id: docker_id.clone(),
            workload: c.workload_id.clone(),
            hash: wl.hash.clone(),
            created_at: c.created_at,
            running: true,
            state_file: StateFile::default(),
        };
        self.hosts
            .get_mut(&c.node_id)
            .unwrap()
            .containers
            .insert(c.id, made);
        docker_id
    }
}

/// A host container as the agent reports it.
pub fn observed(node: &NodeId, id: &ContainerId, c: &HostContainer) -> ObservedContainer {
    let labels = [
        (labels::MANAGED, "true".to_owned()),
        (labels::CONTAINER_ID, id.to_string()),
        (labels::POOL_ID, c.workload.to_string()),
        (labels::WORKLOAD_ID, c.workload.to_string()),
        (labels::NODE_ID, node.to_string()),
        (labels::CREATED_AT, c.created_at.as_millis().to_string()),
        (labels::SPEC_HASH, c.hash.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    ObservedContainer {
        docker_id: c.docker_id.clone(),
        name: format!("bh-{id}"),
        labels,
        docker_state: if c.running { "running" } else { "exited" }.into(),
        health: None,
        health_output: None,
        exit_code: 0,
        started_at: Some(c.created_at),
        oom_killed: false,
        limits: Default::default(),
        state_file: Some(c.state_file.clone()),
    }
}
