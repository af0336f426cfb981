//! bh pool, claim, release, claims and container.

use std::time::{Duration, Instant};

use serde::Serialize;
use tonic::Code;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_proto::pb::container_service_client::ContainerServiceClient;
use boilerhouse_proto::pb::pool_service_client::PoolServiceClient;

use crate::client::{CliError, Client};
use crate::failover::with_request_id;
use crate::output::{self, Format, print_structured, print_table, table};

pub(crate) fn prost_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[derive(Serialize)]
struct PoolView {
    pool: String,
    min_size: u32,
    max_size: u32,
    draining: bool,
    warming: u32,
    idle: u32,
    claimed: u32,
    reserved: u32,
    destroying: u32,
    total: u32,
    /// Of an older spec than the workload's (the rest are current).
    stale: u32,
    /// Why it is below min_size and not being filled.
    #[serde(skip_serializing_if = "String::is_empty")]
    shortfall: String,
}

impl From<&pb::Pool> for PoolView {
    fn from(p: &pb::Pool) -> Self {
        let c = p.counts.unwrap_or_default();
        Self {
            pool: p.pool_id.clone(),
            min_size: p.min_size,
            max_size: p.max_size,
            draining: p.draining,
            warming: c.warming,
            idle: c.idle,
            claimed: c.claimed,
            reserved: c.reserved,
            destroying: c.draining,
            total: c.total,
            stale: c.stale,
            shortfall: p.shortfall.clone(),
        }
    }
}

fn source_name(source: i32) -> &'static str {
    match pb::ClaimSource::try_from(source) {
        Ok(pb::ClaimSource::Existing) => "EXISTING",
        Ok(pb::ClaimSource::Affinity) => "AFFINITY",
        Ok(pb::ClaimSource::Pool) => "POOL",
        Ok(pb::ClaimSource::Cold) => "COLD",
        Ok(pb::ClaimSource::ExistingWithData) => "EXISTING_WITH_DATA",
        Ok(pb::ClaimSource::AffinityWithData) => "AFFINITY_WITH_DATA",
        Ok(pb::ClaimSource::PoolWithData) => "POOL_WITH_DATA",
        Ok(pb::ClaimSource::ColdWithData) => "COLD_WITH_DATA",
        _ => "UNKNOWN",
    }
}

fn state_name(state: i32) -> &'static str {
    match pb::ContainerState::try_from(state) {
        Ok(pb::ContainerState::Warming) => "warming",
        Ok(pb::ContainerState::Idle) => "idle",
        Ok(pb::ContainerState::Claimed) => "claimed",
        Ok(pb::ContainerState::Reserved) => "reserved",
        Ok(pb::ContainerState::Draining) => "destroying",
        Ok(pb::ContainerState::Lost) => "lost",
        _ => "unknown",
    }
}

#[derive(Serialize)]
struct ClaimView {
    tenant: String,
    workload: String,
    container: String,
    node: String,
    docker_id: String,
    source: String,
    generation: u64,
    status: String,
    state_path: String,
    comm_path: String,
    claimed_at: String,
    last_activity_at: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    released_at: String,
}

impl From<&pb::ClaimInfo> for ClaimView {
    fn from(c: &pb::ClaimInfo) -> Self {
        let status = match pb::ClaimStatus::try_from(c.status) {
            Ok(pb::ClaimStatus::Active) => "active",
            Ok(pb::ClaimStatus::Released) => "released",
            Ok(pb::ClaimStatus::Lost) => "lost",
            _ => "unknown",
        };
        Self {
            tenant: c.tenant_id.clone(),
            workload: c.workload_id.clone(),
            container: c.container_id.clone(),
            node: c.node_id.clone(),
            docker_id: c.docker_id.clone(),
            source: source_name(c.source).to_owned(),
            generation: c.generation,
            status: status.to_owned(),
            state_path: c.state_path.clone(),
            comm_path: c.comm_path.clone(),
            claimed_at: output::time(c.claimed_at.as_ref()),
            last_activity_at: output::time(c.last_activity_at.as_ref()),
            released_at: output::time(c.released_at.as_ref()),
        }
    }
}

#[derive(Serialize)]
struct ContainerView {
    id: String,
    workload: String,
    node: String,
    state: String,
    tenant: String,
    last_tenant: String,
    docker_id: String,
    generation: u64,
    state_path: String,
    created_at: String,
}

impl From<&pb::Container> for ContainerView {
    fn from(c: &pb::Container) -> Self {
        Self {
            id: c.container_id.clone(),
            workload: c.workload_id.clone(),
            node: c.node_id.clone(),
            state: state_name(c.state).to_owned(),
            tenant: c.tenant_id.clone(),
            last_tenant: c.last_tenant_id.clone(),
            docker_id: c.docker_id.clone(),
            generation: c.claim_generation,
            state_path: c.state_path.clone(),
            created_at: output::time(c.created_at.as_ref()),
        }
    }
}

fn print_pools(pools: &[pb::Pool], format: Format) -> Result<(), CliError> {
    let views: Vec<PoolView> = pools.iter().map(PoolView::from).collect();
    if format != Format::Table {
        return print_structured(format, &views).map_err(CliError::Output);
    }
    let mut t = table(&[
        "POOL",
        "MIN",
        "MAX",
        "WARMING",
        "IDLE",
        "CLAIMED",
        "RESERVED",
        "DESTROYING",
        "TOTAL",
        "STALE",
        "STATUS",
        "SHORTFALL",
    ]);
    for p in &views {
        t.add_row(vec![
            p.pool.clone(),
            p.min_size.to_string(),
            p.max_size.to_string(),
            p.warming.to_string(),
            p.idle.to_string(),
            p.claimed.to_string(),
            p.reserved.to_string(),
            p.destroying.to_string(),
            p.total.to_string(),
            p.stale.to_string(),
            if p.draining {
                "draining".into()
            } else if !p.shortfall.is_empty() {
                "below min".into()
            } else {
                "active".into()
            },
            p.shortfall.clone(),
        ]);
    }
    print_table(&t);
    Ok(())
}

impl Client {
    pub async fn pool_list(&self, format: Format) -> Result<(), CliError> {
        let pools = PoolServiceClient::new(self.channel())
            .list_pools(pb::ListPoolsRequest {})
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .pools;
        if pools.is_empty() && format == Format::Table {
            out!("No pools.");
            return Ok(());
        }
        print_pools(&pools, format)
    }

    pub async fn pool_get(&self, id: &str, format: Format) -> Result<(), CliError> {
        let pool = PoolServiceClient::new(self.channel())
            .get_pool(pb::GetPoolRequest { pool_id: id.into() })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .pool;
        print_pools(&pool.into_iter().collect::<Vec<_>>(), format)
    }

    pub async fn pool_scale(
        &self,
        id: &str,
        min: Option<u32>,
        max: Option<u32>,
        format: Format,
    ) -> Result<(), CliError> {
        if min.is_none() && max.is_none() {
            return Err(CliError::Input("give --min, --max or both".into()));
        }
        let pool = PoolServiceClient::new(self.channel())
            .scale_pool(pb::ScalePoolRequest {
                pool_id: id.into(),
                min_size: min,
                max_size: max,
                request_id: String::new(),
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .pool;
        print_pools(&pool.into_iter().collect::<Vec<_>>(), format)
    }

    pub async fn pool_drain(&self, id: &str, format: Format) -> Result<(), CliError> {
        let pool = PoolServiceClient::new(self.channel())
            .drain_pool(pb::DrainPoolRequest {
                pool_id: id.into(),
                request_id: String::new(),
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .pool;
        print_pools(&pool.into_iter().collect::<Vec<_>>(), format)
    }

    pub async fn claim(
        &self,
        tenant: &str,
        workload: &str,
        timeout: Option<Duration>,
        request_id: String,
        format: Format,
    ) -> Result<(), CliError> {
        let request = pb::ClaimRequest {
            tenant_id: tenant.into(),
            workload_id: workload.into(),
            request_id,
            acquire_timeout: timeout.map(prost_duration),
        };
        let started = Instant::now();
        let mut client = ClaimServiceClient::new(self.channel());
        let request_id = request.request_id.clone();
        let call = client.claim(with_request_id(request, &request_id));
        tokio::pin!(call);
        // A cold start can take seconds: say so instead of hanging silently.
        let response = loop {
            tokio::select! {
                r = &mut call => break r,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    eprintln!("bh: waiting for a container of {workload} ({}s)…", started.elapsed().as_secs());
                }
            }
        };
        let response = response.map_err(|s| {
            if s.code() == Code::ResourceExhausted {
                CliError::Server(format!(
                    "no container available: {} (try again shortly)",
                    s.message()
                ))
            } else {
                self.fail(s)
            }
        })?;
        let response = response.into_inner();
        let claim = response.claim.unwrap_or_default();
        let view = ClaimView::from(&claim);
        if format != Format::Table {
            return print_structured(format, &view).map_err(CliError::Output);
        }
        out!(
            "{} claimed {} on {} ({}, {} in the server)",
            view.tenant,
            view.container,
            view.node,
            view.source,
            output::duration(response.server_latency.as_ref())
        );
        out!("  docker id:   {}", view.docker_id);
        out!("  generation:  {}", view.generation);
        if !view.state_path.is_empty() {
            out!("  state path:  {}", view.state_path);
        }
        if !view.comm_path.is_empty() {
            out!("  comm path:   {}", view.comm_path);
        }
        if !response.restore_warning.is_empty() {
            eprintln!("bh: warning: {}", response.restore_warning);
        }
        if !response.node_warning.is_empty() {
            eprintln!("bh: warning: {}", response.node_warning);
        }
        Ok(())
    }

    pub async fn release(
        &self,
        tenant: &str,
        workload: &str,
        generation: Option<u64>,
        format: Format,
    ) -> Result<(), CliError> {
        let mut client = ClaimServiceClient::new(self.channel());
        let generation = match generation {
            Some(g) => g,
            None => client
                .get_claim(pb::GetClaimRequest {
                    tenant_id: tenant.into(),
                    workload_id: workload.into(),
                })
                .await
                .map_err(|s| self.fail(s))?
                .into_inner()
                .claim
                .map(|c| c.generation)
                .unwrap_or_default(),
        };
        let response = client
            .release(pb::ReleaseRequest {
                tenant_id: tenant.into(),
                workload_id: workload.into(),
                generation,
                request_id: String::new(),
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner();
        let view = ClaimView::from(&response.claim.unwrap_or_default());
        if format != Format::Table {
            return print_structured(format, &view).map_err(CliError::Output);
        }
        match response.affinity_expires_at {
            Some(t) => out!(
                "{} released {}; kept for {} until {}",
                view.tenant,
                view.container,
                view.tenant,
                output::time(Some(&t))
            ),
            None => out!(
                "{} released {}; it will be destroyed",
                view.tenant,
                view.container
            ),
        }
        Ok(())
    }

    pub async fn claims_list(
        &self,
        workload: Option<String>,
        tenant: Option<String>,
        all: bool,
        format: Format,
    ) -> Result<(), CliError> {
        let claims = ClaimServiceClient::new(self.channel())
            .list_claims(pb::ListClaimsRequest {
                workload_id: workload.unwrap_or_default(),
                node_id: String::new(),
                tenant_id: tenant.unwrap_or_default(),
                include_ended: all,
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .claims;
        let views: Vec<ClaimView> = claims.iter().map(ClaimView::from).collect();
        if format != Format::Table {
            return print_structured(format, &views).map_err(CliError::Output);
        }
        if views.is_empty() {
            out!("No claims.");
            return Ok(());
        }
        let mut t = table(&[
            "TENANT",
            "WORKLOAD",
            "CONTAINER",
            "NODE",
            "SOURCE",
            "GEN",
            "STATUS",
            "AGE",
        ]);
        for (v, c) in views.iter().zip(&claims) {
            t.add_row(vec![
                v.tenant.clone(),
                v.workload.clone(),
                v.container.clone(),
                v.node.clone(),
                v.source.clone(),
                v.generation.to_string(),
                v.status.clone(),
                output::age(c.claimed_at.as_ref()),
            ]);
        }
        print_table(&t);
        Ok(())
    }

    pub async fn container_list(
        &self,
        workload: Option<String>,
        node: Option<String>,
        format: Format,
    ) -> Result<(), CliError> {
        let list = ContainerServiceClient::new(self.channel())
            .list_containers(pb::ListContainersRequest {
                workload_id: workload.unwrap_or_default(),
                node_id: node.unwrap_or_default(),
                tenant_id: String::new(),
                state: 0,
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .containers;
        let views: Vec<ContainerView> = list.iter().map(ContainerView::from).collect();
        if format != Format::Table {
            return print_structured(format, &views).map_err(CliError::Output);
        }
        if views.is_empty() {
            out!("No containers.");
            return Ok(());
        }
        let mut t = table(&[
            "ID",
            "WORKLOAD",
            "NODE",
            "STATE",
            "TENANT",
            "DOCKER ID",
            "AGE",
        ]);
        for (v, c) in views.iter().zip(&list) {
            t.add_row(vec![
                v.id.clone(),
                v.workload.clone(),
                v.node.clone(),
                v.state.clone(),
                if v.tenant.is_empty() {
                    "-".into()
                } else {
                    v.tenant.clone()
                },
                v.docker_id.chars().take(12).collect(),
                output::age(c.created_at.as_ref()),
            ]);
        }
        print_table(&t);
        Ok(())
    }

    pub async fn container_get(&self, id: &str, format: Format) -> Result<(), CliError> {
        let c = ContainerServiceClient::new(self.channel())
            .get_container(pb::GetContainerRequest {
                container_id: id.into(),
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .container
            .unwrap_or_default();
        let view = ContainerView::from(&c);
        let format = if format == Format::Table {
            Format::Yaml
        } else {
            format
        };
        print_structured(format, &view).map_err(CliError::Output)
    }

    pub async fn container_destroy(
        &self,
        id: &str,
        force: bool,
        format: Format,
    ) -> Result<(), CliError> {
        let c = ContainerServiceClient::new(self.channel())
            .destroy_container(pb::DestroyContainerRequest {
                container_id: id.into(),
                force,
                request_id: String::new(),
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .container
            .unwrap_or_default();
        let view = ContainerView::from(&c);
        if format != Format::Table {
            return print_structured(format, &view).map_err(CliError::Output);
        }
        out!("container/{} is being destroyed", view.id);
        Ok(())
    }
}
