//! Prometheus metrics, served on their own port so scraping never competes
//! with the API and can be firewalled separately.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::workloads::WorkloadDir;

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    /// Agents with a live session.
    pub agents_connected: Gauge,
    workloads: Gauge,
    workload_load_errors: Gauge,
    store_commits: Counter,
    store_writes: Counter,
    store_shared_trips: Counter,
    store_undone_runs: Counter,
    store: Store,
    workload_dir: WorkloadDir,
    agents: crate::agents::Registry,
    claim_latency: Family<Vec<(String, String)>, Histogram>,
    boosts_live: Family<Vec<(String, String)>, Gauge>,
    boost_expiry_lag: Histogram,
    boost_ledger: crate::boosts::BoostLedger,
    syncs: crate::syncs::Syncs,
    sync_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    sync_runs: Family<Vec<(String, String)>, Counter>,
    sync_bytes: Counter,
    sync_owed_uploads: Gauge,
}

impl Metrics {
    /// Registers the metrics. Values read from other components are sampled
    /// at scrape time, so they are never stale.
    pub fn new(
        store: Store,
        workload_dir: WorkloadDir,
        agents: crate::agents::Registry,
        boost_ledger: crate::boosts::BoostLedger,
        syncs: crate::syncs::Syncs,
    ) -> Self {
        let mut registry = Registry::with_prefix("boilerhouse");
        let agents_connected = Gauge::default();
        registry.register(
            "agents_connected",
            "Agents with a live session",
            agents_connected.clone(),
        );
        let workloads = Gauge::default();
        registry.register("workloads", "Valid workloads loaded", workloads.clone());
        let workload_load_errors = Gauge::default();
        registry.register(
            "workload_load_errors",
            "Workload files that currently fail to load",
            workload_load_errors.clone(),
        );
        let store_commits = Counter::default();
        registry.register(
            "store_commits",
            "Database write transactions committed",
            store_commits.clone(),
        );
        let store_writes = Counter::default();
        registry.register(
            "store_writes",
            "Database write operations committed (group commit batches several per transaction)",
            store_writes.clone(),
        );
        let store_shared_trips = Counter::default();
        registry.register(
            "store_shared_trips",
            "SQLite: writes that went to the database in the same round trip as the write before them",
            store_shared_trips.clone(),
        );
        let store_undone_runs = Counter::default();
        registry.register(
            "store_undone_runs",
            "SQLite: runs of writes sent together that were rolled back whole because a write after the first failed",
            store_undone_runs.clone(),
        );
        let claim_latency =
            Family::<Vec<(String, String)>, Histogram>::new_with_constructor(|| {
                // 50µs to ~26s, doubling: warm claims and cold starts both land
                // in useful buckets.
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.00005, 2.0, 20,
                ))
            });
        registry.register(
            "claim_latency_seconds",
            "Server-side Claim latency, by source",
            claim_latency.clone(),
        );
        let boosts_live = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "boosts_live",
            "Pending and active boosts, by resource and status",
            boosts_live.clone(),
        );
        // 1ms to ~65s, doubling.
        let boost_expiry_lag = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17),
        );
        registry.register(
            "boost_expiry_lag_seconds",
            "How long after its deadline each boost was ended",
            boost_expiry_lag.clone(),
        );
        let sync_lag = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "sync_lag_seconds",
            "Largest time since a claimed container's files last reached the sink (periodic syncs)",
            sync_lag.clone(),
        );
        let sync_runs = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "sync_runs",
            "Tenant state syncs, by result",
            sync_runs.clone(),
        );
        let sync_bytes = Counter::default();
        registry.register(
            "sync_transferred_bytes",
            "Bytes moved by tenant state syncs",
            sync_bytes.clone(),
        );
        let sync_owed_uploads = Gauge::default();
        registry.register(
            "sync_owed_uploads",
            "Released containers whose upload failed and is being retried",
            sync_owed_uploads.clone(),
        );
        Self {
            syncs,
            sync_lag,
            sync_runs,
            sync_bytes,
            sync_owed_uploads,
            boosts_live,
            boost_expiry_lag,
            boost_ledger,
            claim_latency,
            registry,
            agents_connected,
            workloads,
            workload_load_errors,
            store_commits,
            store_writes,
            store_shared_trips,
            store_undone_runs,
            store,
            workload_dir,
            agents,
        }
    }

    /// Records one granted claim.
    pub fn observe_claim(
        &self,
        source: boilerhouse_core::pool::ClaimSource,
        latency: std::time::Duration,
    ) {
        self.claim_latency
            .get_or_create(&vec![("source".to_owned(), source.as_str().to_owned())])
            .observe(latency.as_secs_f64());
    }

    async fn render(&self) -> Result<String, std::fmt::Error> {
        for lag in self.boost_ledger.take_expiry_lags() {
            self.boost_expiry_lag.observe(lag.as_secs_f64());
        }
        let stats = self.store.writer_stats();
        // Counters only go up: add the difference since the last scrape.
        self.store_commits
            .inc_by(stats.commits.saturating_sub(self.store_commits.get()));
        self.store_writes
            .inc_by(stats.operations.saturating_sub(self.store_writes.get()));
        self.store_shared_trips.inc_by(
            stats
                .shared_trips
                .saturating_sub(self.store_shared_trips.get()),
        );
        self.store_undone_runs.inc_by(
            stats
                .undone_runs
                .saturating_sub(self.store_undone_runs.get()),
        );
        if let Ok(workloads) = self.store.list_workloads().await {
            self.workloads.set(workloads.len() as i64);
        }
        self.workload_load_errors
            .set(self.workload_dir.load_errors().len() as i64);
        self.agents_connected.set(self.agents.connected() as i64);
        self.boosts_live.clear();
        for b in self.boost_ledger.live() {
            self.boosts_live
                .get_or_create(&vec![
                    ("resource".to_owned(), b.resource.as_str().to_owned()),
                    ("status".to_owned(), b.status.as_str().to_owned()),
                ])
                .inc();
        }
        let counters = self.syncs.counters();
        let ordering = std::sync::atomic::Ordering::Relaxed;
        self.sync_lag
            .set(counters.max_lag_ms.load(ordering) as f64 / 1000.0);
        for (result, value) in [("ok", &counters.ok), ("failed", &counters.failed)] {
            let counter = self
                .sync_runs
                .get_or_create(&vec![("result".to_owned(), result.to_owned())]);
            counter.inc_by(value.load(ordering).saturating_sub(counter.get()));
        }
        self.sync_bytes.inc_by(
            counters
                .bytes
                .load(ordering)
                .saturating_sub(self.sync_bytes.get()),
        );
        self.sync_owed_uploads.set(self.syncs.owed().len() as i64);
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    match metrics.render().await {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Serves `/metrics` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}

/// The bound address, for logs and the ready file.
pub fn local_addr(listener: &TcpListener) -> std::io::Result<SocketAddr> {
    listener.local_addr()
}
