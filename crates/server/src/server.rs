//! Assembles and runs boilerhoused, in the startup order of the design:
//!
//! 1. open the database and migrate;
//! 2. load the workload directory (invalid files are skipped and reported);
//! 3. rebuild in-memory indexes (none yet);
//! 4. start background tasks;
//! 5. serve the API, health, reflection and metrics;
//! 6. on the shutdown signal: mark NOT_SERVING, stop accepting, end
//!    long-lived streams, stop tasks, close the database. Containers are
//!    never touched by shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use notify::Watcher as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic_health::ServingStatus;

use boilerhouse_core::event::{EventKind, NewEvent};
use boilerhouse_core::liveness::LivenessConfig;
use boilerhouse_proto::pb;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::metrics::{self, Metrics};
use crate::store::StoreOptions;
use crate::tasks::Driver;
use crate::workloads::{ReloadTask, WorkloadDir};

/// The addresses the server actually bound, written to the ready file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BoundAddrs {
    /// gRPC.
    pub grpc: std::net::SocketAddr,
    /// Prometheus.
    pub metrics: std::net::SocketAddr,
    /// The server's process id.
    pub pid: u32,
    /// "leader", or "standby" (PostgreSQL replicas); SQLite: "leader".
    #[serde(default)]
    pub role: String,
}

/// Every gRPC service name, for health statuses.
const SERVICES: &[&str] = &[
    "boilerhouse.v1.WorkloadService",
    "boilerhouse.v1.PoolService",
    "boilerhouse.v1.ClaimService",
    "boilerhouse.v1.AffinityService",
    "boilerhouse.v1.ContainerService",
    "boilerhouse.v1.NodeService",
    "boilerhouse.v1.BoostService",
    "boilerhouse.v1.SyncService",
    "boilerhouse.v1.EventService",
    "boilerhouse.v1.ReconcileService",
    "boilerhouse.v1.AgentService",
    "boilerhouse.v1.SystemService",
    "boilerhouse.v1.AdminService",
];

/// Runs the server on the given listeners until `shutdown` resolves. A
/// replica elected leader passes its `fence` and its `warm` copy of the
/// pool's rows.
pub async fn run(
    config: Config,
    grpc_listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    fence: Option<crate::store::Fence>,
    warm: Option<crate::store::WarmPool>,
) -> anyhow::Result<()> {
    // Checked first, and a SQLite file is refused rather than replaced
    // when missing or damaged; the guard holds its lock until run() returns.
    let (store, database) = crate::database::open(
        &config.database,
        config.rebuild_from_agents,
        StoreOptions {
            synchronous_full: config.synchronous_full,
            fence,
            max_batch: config.group_commit_max,
            ..StoreOptions::default()
        },
    )
    .await?;
    tracing::info!(database = %config.database, backend = store.backend().as_str(), origin = ?database.origin(), "database open");

    tracing::info!(
        policy_file = %config.policy_file.as_deref().map_or("(none: strict defaults)".into(), |p| p.display().to_string()),
        "admission policy read"
    );
    let workloads = WorkloadDir::new(
        config.workloads_dir.clone(),
        store.clone(),
        config.admission.clone(),
    )
    .with_context(|| {
        format!(
            "creating workload directory {}",
            config.workloads_dir.display()
        )
    })?;
    let summary = workloads
        .reload(crate::clock::now())
        .await
        .context("loading workloads")?;
    tracing::info!(
        dir = %config.workloads_dir.display(),
        valid = summary.valid,
        invalid = summary.invalid,
        "workloads loaded"
    );

    let cancel = CancellationToken::new();
    let stop_accepting = CancellationToken::new();
    let tracker = TaskTracker::new();
    let driver = Driver::new(cancel.child_token(), tracker.clone());
    let reload_workloads = driver.register(
        "workload_loader",
        config.workloads_rescan_interval,
        Some(Duration::from_millis(200)),
        ReloadTask {
            dir: workloads.clone(),
        },
    );
    driver.register(
        "wal_checkpoint",
        crate::store::maintenance::CHECKPOINT_INTERVAL,
        None,
        crate::store::maintenance::CheckpointTask(store.clone()),
    );
    driver.register(
        "activity_log_trim",
        config.trim_interval,
        None,
        crate::store::maintenance::TrimTask {
            store: store.clone(),
            event_retention: config.event_retention,
            idempotency_retention: config.idempotency_retention,
            history_retention: config.history_retention,
            whole_checked: database.whole_checked(),
        },
    );

    // File notifications make reloads prompt; the periodic rescan covers
    // any that are lost. The watcher lives until run() returns.
    let _watcher = {
        let activator = reload_workloads.clone();
        let watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
            // Access events are the loader's own reads; reacting to them
            // would make every reload trigger the next.
            if let Ok(event) = result
                && !matches!(event.kind, notify::EventKind::Access(_))
            {
                activator.activate();
            }
        });
        match watcher {
            Ok(mut w) => {
                match w.watch(&config.workloads_dir, notify::RecursiveMode::NonRecursive) {
                    Ok(()) => Some(w),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch the workload directory; relying on rescans");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "no file watcher; relying on rescans");
                None
            }
        }
    };

    let agents = crate::agents::Registry::default();
    let boost_ledger = crate::boosts::BoostLedger::default();
    let syncs = crate::syncs::Syncs::load(
        store.clone(),
        agents.clone(),
        crate::syncs::SyncsConfig {
            sync_timeout: config.sync_timeout,
        },
    )
    .await
    .context("loading sync statuses")?;
    let pools = crate::pools::Pools::load(
        store.clone(),
        agents.clone(),
        crate::pools::PoolsConfig {
            suspect_after: config.suspect_after,
            command_timeout: config.command_timeout,
            acquire_timeout: config.acquire_timeout,
            surplus_grace: config.pool_surplus_grace,
        },
        Arc::new(boost_ledger.clone()),
        Arc::new(syncs.clone()),
        warm,
    )
    .await
    .context("rebuilding the pool index")?;
    let tenancy = crate::tenancy::Tenancy {
        pools: pools.clone(),
        syncs: syncs.clone(),
    };
    let metrics = Arc::new(Metrics::new(
        store.clone(),
        workloads.clone(),
        agents.clone(),
        boost_ledger.clone(),
        syncs.clone(),
    ));
    // Boosts that expired while the server was down end now, before the
    // ledger counts them; their limits are reverted once agents report.
    let (boosts, recovered) = crate::boosts::Boosts::load(
        store.clone(),
        agents.clone(),
        pools.clone(),
        boost_ledger.clone(),
        crate::clock::Clock::Wall,
        crate::boosts::BoostsConfig {
            command_timeout: config.command_timeout,
        },
    )
    .await
    .context("recovering boosts")?;
    if recovered.expired + recovered.failed > 0 {
        tracing::info!(
            expired = recovered.expired,
            failed = recovered.failed,
            live = recovered.live,
            "ended boosts that could not survive the restart"
        );
    }
    // Reservations that expired while the server was down end in the
    // affinity_expiry task's first pass, which starts below and runs
    // beside serving: a claim never goes through one past its expiry
    // (it ends it first), and a serving server need not wait for them.
    let refiller = driver.register(
        "pool_refiller",
        Duration::from_secs(1),
        // A burst of claims costs one refill round, not one each.
        Some(Duration::from_millis(50)),
        crate::pools::tasks::Refiller(pools.clone()),
    );
    // Claims and releases wake the refiller at once.
    let refill_pools = pools.clone();
    tracker.spawn(crate::tasks::wake_on(
        move || {
            let pools = refill_pools.clone();
            async move { pools.refill_notify().notified().await }
        },
        move || refiller.activate(),
        cancel.child_token(),
    ));
    driver.register(
        "affinity_expiry",
        Duration::from_secs(1),
        None,
        crate::pools::tasks::AffinityExpiry(pools.clone()),
    );
    driver.register(
        "idle_reaper",
        Duration::from_secs(1),
        None,
        crate::tenancy::IdleReaper(tenancy.clone()),
    );
    driver.register(
        "node_loss",
        Duration::from_secs(2),
        None,
        crate::pools::recovery::NodeLoss(pools.clone()),
    );
    // Agent sessions publish activity, engine destroys and node loss.
    tracker.spawn(pools.clone().follow_signals(cancel.child_token()));
    driver.register(
        "node_liveness",
        Duration::from_secs(1),
        None,
        crate::agents::liveness::LivenessTask {
            store: store.clone(),
            registry: agents.clone(),
            config: LivenessConfig {
                suspect_after: config.suspect_after,
                lost_grace: config.lost_grace,
                restart_grace: config.restart_grace,
                partition_threshold: config.partition_threshold,
            },
            started_at: crate::clock::now(),
            persisted: Default::default(),
            holding: false,
            hold_ended_at: boilerhouse_core::Timestamp::EPOCH,
            held: Default::default(),
            spared: Default::default(),
        },
    );

    let reconciler = crate::reconcile::Reconciler {
        store: store.clone(),
        pools: pools.clone(),
        agents: agents.clone(),
        config: boilerhouse_core::reconcile::PlanConfig {
            lost_grace: config.reconcile_lost_grace,
            creation_grace: config.reconcile_creation_grace,
        },
        command_timeout: config.command_timeout,
    };
    let reconcile_task = driver.register(
        "reconcile",
        config.reconcile_interval,
        None,
        crate::reconcile::ReconcileTask::new(reconciler.clone(), config.reconcile_interval),
    );
    // A node's first report is reconciled at once: the refiller waits for
    // it (see Registry::unreconciled).
    let first_reports = agents.clone();
    tracker.spawn(crate::tasks::wake_on(
        move || {
            let agents = first_reports.clone();
            async move { agents.first_report().await }
        },
        move || reconcile_task.activate(),
        cancel.child_token(),
    ));
    let boost_task = driver.register(
        "boost_expiry",
        Duration::from_secs(1),
        None,
        crate::boosts::BoostTask::new(boosts.clone(), config.boost_full_pass_interval),
    );
    tracker.spawn(crate::boosts::expiry::wake_at_deadlines(
        boost_ledger.clone(),
        crate::clock::Clock::Wall,
        move || boost_task.activate(),
        cancel.child_token(),
    ));
    // Periodic syncs, and at its first pass the catch-up of those whose
    // interval passed while the server was down; owed uploads on release
    // are retried here too.
    driver.register(
        "sync_scheduler",
        Duration::from_secs(1),
        None,
        crate::syncs::task::SyncScheduler::new(syncs.clone(), pools.clone(), crate::clock::now()),
    );
    let state = AppState {
        store: store.clone(),
        workloads: workloads.clone(),
        reload_workloads,
        driver,
        shutdown: cancel.child_token(),
        idempotency: Arc::default(),
        started_at: crate::clock::now(),
        agents: agents.clone(),
        pools: pools.clone(),
        metrics: metrics.clone(),
        reconciler,
        syncs: syncs.clone(),
        tenancy,
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    for service in SERVICES {
        health
            .set_service_status(*service, ServingStatus::Serving)
            .await;
    }
    let reflection_v1 =
        reflection(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET).build_v1()?;
    let reflection_v1alpha =
        reflection(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET).build_v1alpha()?;

    use pb::admin_service_server::AdminServiceServer;
    use pb::affinity_service_server::AffinityServiceServer;
    use pb::agent_service_server::AgentServiceServer;
    use pb::boost_service_server::BoostServiceServer;
    use pb::claim_service_server::ClaimServiceServer;
    use pb::container_service_server::ContainerServiceServer;
    use pb::event_service_server::EventServiceServer;
    use pb::node_service_server::NodeServiceServer;
    use pb::pool_service_server::PoolServiceServer;
    use pb::reconcile_service_server::ReconcileServiceServer;
    use pb::sync_service_server::SyncServiceServer;
    use pb::system_service_server::SystemServiceServer;
    use pb::workload_service_server::WorkloadServiceServer;

    let grpc_addr = grpc_listener.local_addr()?;
    let metrics_addr = metrics::local_addr(&metrics_listener)?;
    let (builder, authenticator) = crate::listener::secure_builder(&config)?;
    let grpc = builder
        // Handlers run to completion even when their client goes away; the
        // caller is checked inside, so the handler's task knows who it
        // serves.
        .layer(api::completion::RunToCompletionLayer)
        .layer(crate::auth::AuthLayer(authenticator))
        .add_service(health_service)
        .add_optional_service(config.reflection.then_some(reflection_v1))
        .add_optional_service(config.reflection.then_some(reflection_v1alpha))
        .add_service(WorkloadServiceServer::new(api::workloads::Workloads(
            state.clone(),
        )))
        .add_service(EventServiceServer::new(api::events::Events(state.clone())))
        .add_service(NodeServiceServer::new(api::nodes::Nodes(state.clone())))
        .add_service(SystemServiceServer::new(api::system::System(state.clone())))
        .add_service(AdminServiceServer::new(api::admin::Admin(state.clone())))
        .add_service(PoolServiceServer::new(api::pools::PoolsApi(state.clone())))
        .add_service(ClaimServiceServer::new(api::pools::Claims(state.clone())))
        .add_service(AffinityServiceServer::new(api::pools::Affinity(
            state.clone(),
        )))
        .add_service(ContainerServiceServer::new(api::pools::Containers(
            state.clone(),
        )))
        .add_service(BoostServiceServer::new(api::boosts::BoostsApi {
            state: state.clone(),
            boosts: boosts.clone(),
        }))
        .add_service(SyncServiceServer::new(api::syncs::SyncApi(state.clone())))
        .add_service(ReconcileServiceServer::new(api::reconcile::Reconcile(
            state.clone(),
        )))
        .add_service(AgentServiceServer::new(crate::agents::service::Agents {
            store: store.clone(),
            registry: agents.clone(),
            timing: crate::agents::service::AgentTiming {
                heartbeat_interval: config.heartbeat_interval,
                full_report_interval: config.full_report_interval,
            },
            shutdown: cancel.child_token(),
        }))
        // Its own token: shutdown stops new RPCs first, while the agents'
        // streams stay open for the final uploads.
        .serve_with_incoming_shutdown(
            crate::listener::incoming_nodelay(grpc_listener),
            stop_accepting.clone().cancelled_owned(),
        );
    let mut grpc = tokio::spawn(grpc);

    let metrics_task = tokio::spawn(metrics::serve(metrics_listener, metrics, cancel.clone()));

    store
        .append_event(
            NewEvent::new(
                crate::clock::now(),
                EventKind::ServerStarted,
                format!(
                    "boilerhoused {} listening on {grpc_addr}",
                    env!("CARGO_PKG_VERSION")
                ),
            )
            .with_attribute("grpc", grpc_addr.to_string())
            .with_attribute("metrics", metrics_addr.to_string()),
        )
        .await?;
    tracing::info!(grpc = %grpc_addr, metrics = %metrics_addr, "boilerhoused serving");
    announce(&config, grpc_addr, Some(metrics_addr), "leader")?;

    // The rest of the startup check, while serving: a damaged database
    // stops the server (an orderly stop) as it would have refused to start.
    let mut damaged = None;
    let early_exit = tokio::select! {
        // Cancel-safe: we leave the select either way and never poll again.
        () = shutdown => None,
        // Cancel-safe: JoinHandle can be polled again after a lost race.
        result = &mut grpc => Some(result),
        refused = database.full_check() => {
            crate::database::record_damage(&store, &refused).await;
            damaged = Some(refused);
            None
        }
    };
    if let Some(result) = early_exit {
        stop_accepting.cancel();
        cancel.cancel();
        result??;
        anyhow::bail!("the gRPC server stopped unexpectedly");
    }

    tracing::info!("shutting down");
    let _ = store
        .append_event(NewEvent::new(
            crate::clock::now(),
            EventKind::ServerStopping,
            "boilerhoused shutting down; containers keep running",
        ))
        .await;
    for service in SERVICES {
        health
            .set_service_status(*service, ServingStatus::NotServing)
            .await;
    }
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    // 1. stop accepting RPCs; 2. no new periodic syncs; 3. final uploads
    // over the still-open agent streams, within their deadline; 4. close
    // the streams and everything else.
    stop_accepting.cancel();
    syncs.begin_shutdown();
    let finals = crate::syncs::final_uploads(
        &syncs,
        &pools,
        crate::syncs::SyncReason::Shutdown,
        None,
        config.final_sync_deadline,
    )
    .await;
    tracing::info!(
        uploaded = finals.ok,
        failed = finals.failed,
        unfinished = finals.unfinished,
        "final uploads done"
    );
    cancel.cancel();
    tracker.close();
    let deadline = config.shutdown_timeout;
    match tokio::time::timeout(deadline, &mut grpc).await {
        // A refusal outranks how the gRPC server ended.
        Ok(result) if damaged.is_none() => result??,
        Ok(_) => {}
        Err(_) => {
            tracing::warn!(
                ?deadline,
                "gRPC connections did not finish in time; closing them"
            );
            grpc.abort();
        }
    }
    if tokio::time::timeout(deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(?deadline, "background tasks did not stop in time");
    }
    let _ = metrics_task.await;
    store.close().await;
    tracing::info!("stopped");
    damaged.map_or(Ok(()), |refused| Err(refused.into()))
}

/// A reflection builder that knows every file a client may meet: our API,
/// health, the google.rpc error details we attach to statuses (so grpcurl
/// can print field violations), and the other reflection version (so that
/// `list` shows both).
pub(crate) fn reflection(
    other_reflection: &'static [u8],
) -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(boilerhouse_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(other_reflection)
}

/// Writes the ready file, if asked for: where this server listens and
/// in which role.
pub(crate) fn announce(
    config: &Config,
    grpc: std::net::SocketAddr,
    metrics: Option<std::net::SocketAddr>,
    role: &str,
) -> anyhow::Result<()> {
    if let Some(path) = &config.ready_file {
        let bound = BoundAddrs {
            grpc,
            metrics: metrics.unwrap_or_else(|| ([0, 0, 0, 0], 0).into()),
            pid: std::process::id(),
            role: role.to_owned(),
        };
        write_ready_file(path, &bound).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn write_ready_file(path: &std::path::Path, bound: &BoundAddrs) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(bound)?)?;
    std::fs::rename(tmp, path)
}
