//! Several servers on one PostgreSQL database, one of them leading.
//!
//! # Invariants
//!
//! - At most one server commits at a time: every write transaction checks
//!   the lease's epoch first, under a share lock held to COMMIT (see
//!   `store::writer`), and the lease is taken only by bumping the epoch.
//!   A leader deposed while it slept (SIGSTOP, a long GC-like stall, a
//!   partition from the database) therefore commits nothing when it wakes.
//! - A leader's memory is its database's: a server serves claims only
//!   after restoring every index from the database and reconciling with
//!   its agents, exactly as after a restart. When it can no longer be sure
//!   of that (it was fenced, its lease could not be renewed in time, or a
//!   COMMIT's outcome is unknown because the connection broke during it),
//!   it stops serving and goes back to standing by; if it is elected again
//!   it restores again.
//! - A standby decides nothing: it refuses every call but health checks
//!   with UNAVAILABLE naming the leader, so clients and agents go there.
//!   It keeps a warm copy of the pool's rows from the database's change
//!   feed ([`WarmPool`]); once elected, it reads only what changed since
//!   (after the lease is its own, so nothing the old leader committed is
//!   missed) instead of every row.
//!
//! The lease is timed by the database's clock (`now()`), so the replicas'
//! clocks need not agree. The leader's own view of its lease is kept on
//! its monotonic clock from the moment it *sent* each renewal, so it gives
//! up no later than the database would let another server take over.
//!
//! On SQLite there is one server and it always leads: none of this runs.

mod standby;

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
use sqlx::AnyConnection;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::{Backend, Fence, Refreshed, StoreError, WarmPool, sql};

/// A lease this server holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Its epoch: one more than the lease's previous holder's.
    pub epoch: i64,
}

/// Who leads, as the database says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// Its advertised URL.
    pub address: String,
    /// Its epoch.
    pub epoch: i64,
}

/// This server's side of the election: its identity and a connection.
pub struct Campaign {
    location: crate::store::DatabaseLocation,
    /// Opened when needed, and dropped after any error: the next call
    /// opens a new one, so a restarted database is reached again.
    conn: Option<AnyConnection>,
    /// Unique per process: a server that restarts is a new candidate and
    /// waits for its old lease to run out like any other.
    me: String,
    address: String,
    lease: Duration,
}

impl Campaign {
    /// Connects (migrating the schema if needed). `address` is what
    /// standbys will name.
    pub async fn connect(config: &Config, address: String) -> Result<Self, StoreError> {
        let conn = crate::store::open_for_leadership(config.database.clone()).await?;
        Ok(Self {
            location: config.database.clone(),
            conn: Some(conn),
            me: uuid::Uuid::now_v7().to_string(),
            address,
            lease: config.leader_lease,
        })
    }

    /// Opens the connection if there is none.
    async fn connect_if_needed(&mut self) -> Result<(), StoreError> {
        if self.conn.is_none() {
            self.conn = Some(crate::store::open_for_leadership(self.location.clone()).await?);
        }
        Ok(())
    }

    fn conn(&mut self) -> Result<&mut AnyConnection, StoreError> {
        self.conn
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("no database connection".into()))
    }

    /// Forgets the connection after an error.
    fn failed<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, StoreError> {
        if result.is_err() {
            self.conn = None;
        }
        Ok(result?)
    }

    /// Takes the lease if it has run out (or is already this server's,
    /// after it stepped down to restore): a new epoch.
    pub fn try_acquire(&mut self) -> BoxFuture<'_, Result<Option<Lease>, StoreError>> {
        Box::pin(async move {
            self.connect_if_needed().await?;
            let row = sql::query_as::<(i64,)>(
                "UPDATE leadership SET epoch = epoch + 1, holder = ?1, address = ?2, \
                 expires_at = now() + CAST(?3 AS DOUBLE PRECISION) * INTERVAL '1 millisecond' \
                 WHERE id = 1 AND (expires_at < now() OR holder = ?1) RETURNING epoch",
            )
            .bind(self.me.clone())
            .bind(self.address.clone())
            .bind(self.lease.as_millis() as f64);
            let row: Option<(i64,)> = {
                let result = row.fetch_optional(&mut *self.conn()?).await;
                self.failed(result)?
            };
            Ok(row.map(|(epoch,)| Lease { epoch }))
        })
    }

    /// Extends the lease. `false`: it is no longer this server's.
    pub fn renew(&mut self, lease: Lease) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            self.connect_if_needed().await?;
            let query = sql::query(
                "UPDATE leadership SET expires_at = now() + CAST(? AS DOUBLE PRECISION) * INTERVAL '1 millisecond' \
                 WHERE id = 1 AND epoch = ? AND holder = ?",
            )
            .bind(self.lease.as_millis() as f64)
            .bind(lease.epoch)
            .bind(self.me.clone());
            let result = query.execute(&mut *self.conn()?).await;
            Ok(self.failed(result)?.rows_affected() == 1)
        })
    }

    /// Gives the lease up at once (a clean shutdown), so a standby need
    /// not wait for it to run out.
    pub fn resign(&mut self, lease: Lease) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.connect_if_needed().await?;
            let query = sql::query(
                "UPDATE leadership SET expires_at = to_timestamp(0) WHERE id = 1 AND epoch = ? AND holder = ?",
            )
            .bind(lease.epoch)
            .bind(self.me.clone());
            let result = query.execute(&mut *self.conn()?).await;
            self.failed(result).map(|_| ())
        })
    }

    /// Brings a standby's warm copy of the pool's rows up to date.
    pub fn refresh<'a>(
        &'a mut self,
        warm: &'a mut WarmPool,
    ) -> BoxFuture<'a, Result<Refreshed, StoreError>> {
        Box::pin(async move {
            self.connect_if_needed().await?;
            let refreshed = warm.refresh(self.conn()?).await;
            if refreshed.is_err() {
                self.conn = None;
            }
            refreshed
        })
    }

    /// The current leader, if its lease has not run out.
    pub fn leader(&mut self) -> BoxFuture<'_, Result<Option<Leader>, StoreError>> {
        Box::pin(async move {
            self.connect_if_needed().await?;
            let query = sql::query_as::<(String, i64)>(
                "SELECT address, epoch FROM leadership WHERE id = 1 AND expires_at > now()",
            );
            let result = query.fetch_optional(&mut *self.conn()?).await;
            Ok(self
                .failed(result)?
                .map(|(address, epoch)| Leader { address, epoch }))
        })
    }
}

/// The URL standbys name for this server: `advertise_url`, or the address
/// it is bound to (so `--listen 127.0.0.1:0` names the real port).
fn advertised(config: &Config, bound: std::net::SocketAddr) -> String {
    if let Some(url) = &config.advertise_url {
        return url.clone();
    }
    let scheme = match config.security {
        crate::config::Security::Insecure => "http",
        crate::config::Security::Secure { .. } => "https",
    };
    format!("{scheme}://{bound}")
}

/// How often a standby tries to take the lease.
fn campaign_interval(lease: Duration) -> Duration {
    (lease / 6).clamp(Duration::from_millis(100), Duration::from_secs(2))
}

/// Runs the server: on SQLite, as the only server; on PostgreSQL, standing
/// by until it takes the lease, then leading until `shutdown` or until it
/// loses the lease, then standing by again.
pub async fn run(
    config: Config,
    grpc: TcpListener,
    metrics: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    if config.database.backend() == Backend::Sqlite {
        return crate::server::run(config, grpc, metrics, shutdown, None, None).await;
    }
    let stop = CancellationToken::new();
    let signal = stop.clone();
    let shutdown = async move {
        shutdown.await;
        signal.cancel();
    };
    // Whatever ends replication (a shutdown, or an error such as a refused
    // database) ends the wait for a signal too.
    let replication = async {
        let result = replicate(config, grpc, metrics, stop.clone()).await;
        stop.cancel();
        result
    };
    let (result, ()) = tokio::join!(replication, async {
        tokio::select! {
            () = shutdown => {}
            () = stop.cancelled() => {}
        }
    });
    result
}

async fn replicate(
    config: Config,
    grpc: TcpListener,
    metrics: TcpListener,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let address = advertised(&config, grpc.local_addr()?);
    let grpc = grpc.into_std()?;
    let metrics = metrics.into_std()?;
    let reuse = |l: &std::net::TcpListener| -> anyhow::Result<TcpListener> {
        Ok(TcpListener::from_std(l.try_clone()?)?)
    };
    // Before anything is migrated: an emptied database this server used
    // before is refused, not made anew.
    if !check_until(&config, &stop).await? {
        return Ok(());
    }
    let mut campaign = connect_until(&config, &address, &stop).await;
    if campaign.is_some() {
        crate::database::postgres::remember(&config.database, &config.data_dir)?;
    }
    loop {
        let Some(mut campaign_now) = campaign.take() else {
            return Ok(());
        };
        // Standing by: refuse calls, naming the leader, and keep a warm
        // copy of the pool's rows, until elected.
        let mut warm = WarmPool::default();
        let elected = standby::stand_by(
            &config,
            reuse(&grpc)?,
            &mut campaign_now,
            &mut warm,
            stop.clone(),
        )
        .await?;
        let Some(lease) = elected else {
            return Ok(());
        };
        tracing::info!(epoch = lease.epoch, %address, "elected leader; restoring from the database");
        let lost = CancellationToken::new();
        let fence = Fence {
            epoch: lease.epoch,
            lease: config.leader_lease,
            lost: lost.clone(),
        };
        let holder = tokio::spawn(hold(campaign_now, lease, config.leader_lease, lost.clone()));
        let leading = crate::server::run(
            config.clone(),
            reuse(&grpc)?,
            reuse(&metrics)?,
            {
                let stop = stop.clone();
                let lost = lost.clone();
                async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = lost.cancelled() => {}
                    }
                }
            },
            Some(fence),
            Some(warm),
        )
        .await;
        lost.cancel();
        let mut campaign_back = holder.await.context("the lease holder task")?;
        if stop.is_cancelled() {
            if let Err(e) = campaign_back.resign(lease).await {
                tracing::warn!(error = %e, "could not give the lease up; a standby takes over when it runs out");
            }
            return leading;
        }
        if let Err(e) = leading {
            tracing::error!(error = %format!("{e:#}"), "leading failed");
        }
        tracing::warn!(epoch = lease.epoch, "no longer leading; standing by");
        campaign = Some(campaign_back);
    }
}

/// [`crate::database::postgres::check`], retrying while the database is
/// unreachable; a refusal is returned. `false`: stopped meanwhile.
async fn check_until(config: &Config, stop: &CancellationToken) -> anyhow::Result<bool> {
    let mut delay = Duration::from_millis(200);
    loop {
        match crate::database::postgres::check(
            &config.database,
            &config.data_dir,
            config.rebuild_from_agents,
        )
        .await
        {
            Ok(found) => {
                tracing::info!(database = %config.database, ?found, "database checked");
                return Ok(true);
            }
            Err(e) if e.downcast_ref::<crate::database::Refused>().is_some() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), ?delay, "cannot reach the database to check it; retrying");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(false),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Connects the campaign, retrying while the database is unreachable.
async fn connect_until(
    config: &Config,
    address: &str,
    stop: &CancellationToken,
) -> Option<Campaign> {
    let mut delay = Duration::from_millis(200);
    loop {
        match Campaign::connect(config, address.to_owned()).await {
            Ok(c) => return Some(c),
            Err(e) => {
                tracing::warn!(error = %e, ?delay, "cannot reach the database to stand for leader; retrying");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Renews the lease every third of its length until `lost` is cancelled
/// (by the server stopping, by the fence) or it cannot be renewed before
/// it would run out, which cancels `lost`. Returns the campaign for the
/// next round.
async fn hold(
    mut campaign: Campaign,
    lease: Lease,
    length: Duration,
    lost: CancellationToken,
) -> Campaign {
    // Counted from before the request that took the lease went out: the
    // database's deadline is later than this one, never earlier.
    let mut valid_until = Instant::now() + length;
    let every = length / 3;
    loop {
        tokio::select! {
            () = lost.cancelled() => return campaign,
            () = tokio::time::sleep(every) => {}
        }
        let sent = Instant::now();
        let attempt = tokio::time::timeout(every, campaign.renew(lease)).await;
        match attempt {
            Ok(Ok(true)) => valid_until = sent + length,
            Ok(Ok(false)) => {
                tracing::error!(epoch = lease.epoch, "the lease was taken by another server");
                lost.cancel();
                return campaign;
            }
            // The connection is replaced on the next try.
            Ok(Err(e)) => tracing::warn!(error = %e, "could not renew the lease"),
            Err(_) => {
                tracing::warn!("renewing the lease timed out");
                // The abandoned query left the connection mid-protocol.
                campaign.conn = None;
            }
        }
        // Give up a little before the lease could run out in the database:
        // another server may then take it.
        if Instant::now() + every / 2 >= valid_until {
            tracing::error!(
                epoch = lease.epoch,
                "the lease could not be renewed in time; stepping down"
            );
            lost.cancel();
            return campaign;
        }
    }
}
