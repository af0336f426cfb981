//! bh boost: request, status, get, release.

use std::time::Duration;

use serde::Serialize;

use boilerhouse_core::boost::BoostResource;
use boilerhouse_core::units::{format_size, parse_size};
use boilerhouse_proto::pb;
use boilerhouse_proto::pb::boost_service_client::BoostServiceClient;

use crate::client::{CliError, Client};
use crate::failover::with_request_id;
use crate::output::{self, Format, print_structured, print_table, table};

/// What `bh boost request` asks for, as typed.
pub struct BoostArgs {
    pub target: String,
    pub resource: String,
    pub amount: String,
    pub priority: String,
    pub duration: Option<Duration>,
    pub source: Option<String>,
    pub request_id: Option<String>,
}

/// `node/NAME`, `container/ID`, `tenant/TENANT/WORKLOAD`; a bare UUID is a
/// container and a bare name a node, as in `bh boost request gpu-1 cpu 2`.
pub fn parse_target(s: &str) -> Result<pb::BoostTarget, CliError> {
    use pb::boost_target::Target;
    let target = if let Some(node) = s.strip_prefix("node/") {
        Target::NodeId(node.to_owned())
    } else if let Some(container) = s.strip_prefix("container/") {
        Target::ContainerId(container.to_owned())
    } else if let Some(rest) = s.strip_prefix("tenant/") {
        let (tenant, workload) = rest.split_once('/').ok_or_else(|| {
            CliError::Input(format!(
                "target {s:?}: a tenant target is tenant/TENANT/WORKLOAD"
            ))
        })?;
        Target::Tenant(pb::TenantTarget {
            tenant_id: tenant.to_owned(),
            workload_id: workload.to_owned(),
        })
    } else if s.contains('/') {
        return Err(CliError::Input(format!(
            "target {s:?}: write node/NAME, container/ID or tenant/TENANT/WORKLOAD"
        )));
    } else if s.parse::<boilerhouse_core::ContainerId>().is_ok() {
        Target::ContainerId(s.to_owned())
    } else {
        Target::NodeId(s.to_owned())
    };
    Ok(pb::BoostTarget {
        target: Some(target),
    })
}

/// Cores (`2`, `1.5`, `500m`), a size for memory (`512M`, `2G`; a bare
/// number is bytes, as Docker reads it), whole GPUs. Anything that reads
/// as a number goes to the server as is, so its validation answers for
/// zero, negative or NaN amounts.
pub fn parse_amount(resource: BoostResource, s: &str) -> Result<f64, CliError> {
    if let Ok(n) = s.trim().parse::<f64>() {
        return Ok(n);
    }
    let bad = |hint: &str| CliError::Input(format!("amount {s:?}: {hint}"));
    match resource {
        BoostResource::Cpu => s
            .trim()
            .strip_suffix('m')
            .and_then(|m| m.parse::<f64>().ok())
            .map(|milli| milli / 1000.0)
            .ok_or_else(|| bad("write cores like 2, 1.5 or 500m")),
        BoostResource::Memory => parse_size(s)
            .map(|b| b as f64)
            .map_err(|e| bad(&format!("{e}; write sizes like 512M or 2G"))),
        BoostResource::Gpu => Err(bad("write a whole number of GPUs")),
    }
}

fn resource_of(r: i32) -> Option<BoostResource> {
    match pb::ResourceKind::try_from(r) {
        Ok(pb::ResourceKind::Cpu) => Some(BoostResource::Cpu),
        Ok(pb::ResourceKind::Memory) => Some(BoostResource::Memory),
        Ok(pb::ResourceKind::Gpu) => Some(BoostResource::Gpu),
        _ => None,
    }
}

fn amount_text(resource: Option<BoostResource>, amount: f64) -> String {
    match resource {
        Some(BoostResource::Memory) => format_size(amount.max(0.0).round() as u64),
        _ => format!("{amount}"),
    }
}

fn target_text(t: Option<&pb::BoostTarget>) -> String {
    use pb::boost_target::Target;
    match t.and_then(|t| t.target.as_ref()) {
        Some(Target::NodeId(n)) => format!("node/{n}"),
        Some(Target::ContainerId(c)) => format!("container/{c}"),
        Some(Target::Tenant(t)) => format!("tenant/{}/{}", t.tenant_id, t.workload_id),
        None => String::new(),
    }
}

fn lower_enum_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

#[derive(Serialize)]
struct BoostView {
    id: String,
    target: String,
    container: String,
    resource: String,
    amount: f64,
    amount_text: String,
    priority: String,
    source: String,
    status: String,
    reason: String,
    enforced_on_host: bool,
    requested_at: String,
    allocated_at: String,
    expires_at: String,
    ended_at: String,
    remaining: String,
}

impl From<&pb::Boost> for BoostView {
    fn from(b: &pb::Boost) -> Self {
        let resource = resource_of(b.resource);
        let priority = pb::BoostPriority::try_from(b.priority)
            .map(|p| lower_enum_name(p.as_str_name(), "BOOST_PRIORITY_"))
            .unwrap_or_default();
        let status = pb::BoostStatus::try_from(b.status)
            .map(|s| lower_enum_name(s.as_str_name(), "BOOST_STATUS_"))
            .unwrap_or_default();
        Self {
            id: b.boost_id.clone(),
            target: target_text(b.target.as_ref()),
            container: b.container_id.clone(),
            resource: resource.map(|r| r.as_str().to_owned()).unwrap_or_default(),
            amount: b.amount,
            amount_text: amount_text(resource, b.amount),
            priority,
            source: b.source_node_id.clone(),
            status,
            reason: b.reason.clone(),
            enforced_on_host: b.enforced_on_host,
            requested_at: output::time(b.requested_at.as_ref()),
            allocated_at: output::time(b.allocated_at.as_ref()),
            expires_at: output::time(b.expires_at.as_ref()),
            ended_at: output::time(b.ended_at.as_ref()),
            remaining: b
                .remaining
                .as_ref()
                .map(|d| output::short_duration(Duration::new(d.seconds.max(0) as u64, 0)))
                .unwrap_or_else(|| "-".to_owned()),
        }
    }
}

fn print_boosts(boosts: &[pb::Boost], format: Format) -> Result<(), CliError> {
    let views: Vec<BoostView> = boosts.iter().map(BoostView::from).collect();
    if format != Format::Table {
        return print_structured(format, &views).map_err(CliError::Output);
    }
    if views.is_empty() {
        out!("No boosts.");
        return Ok(());
    }
    let mut t = table(&[
        "ID",
        "TARGET",
        "RESOURCE",
        "AMOUNT",
        "PRIORITY",
        "SOURCE",
        "STATUS",
        "REMAINING",
        "REASON",
    ]);
    for v in &views {
        t.add_row(vec![
            v.id.clone(),
            v.target.clone(),
            v.resource.clone(),
            v.amount_text.clone(),
            v.priority.clone(),
            v.source.clone(),
            v.status.clone(),
            v.remaining.clone(),
            v.reason.clone(),
        ]);
    }
    print_table(&t);
    Ok(())
}

impl Client {
    pub async fn boost_request(&self, args: BoostArgs, format: Format) -> Result<(), CliError> {
        let resource: BoostResource = args
            .resource
            .parse()
            .map_err(|e: String| CliError::Input(e))?;
        let priority = match args.priority.to_ascii_lowercase().as_str() {
            "low" => pb::BoostPriority::Low,
            "normal" => pb::BoostPriority::Normal,
            "high" => pb::BoostPriority::High,
            "critical" => pb::BoostPriority::Critical,
            other => {
                return Err(CliError::Input(format!(
                    "--priority {other:?}: use low, normal, high or critical"
                )));
            }
        };
        let request = pb::RequestBoostRequest {
            target: Some(parse_target(&args.target)?),
            resource: match resource {
                BoostResource::Cpu => pb::ResourceKind::Cpu,
                BoostResource::Memory => pb::ResourceKind::Memory,
                BoostResource::Gpu => pb::ResourceKind::Gpu,
            } as i32,
            amount: parse_amount(resource, &args.amount)?,
            priority: priority as i32,
            duration: args.duration.map(|d| prost_types::Duration {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
            }),
            source_node_id: args.source.unwrap_or_default(),
            request_id: args.request_id.unwrap_or_default(),
        };
        let request_id = request.request_id.clone();
        let response = BoostServiceClient::new(self.channel())
            .request_boost(with_request_id(request, &request_id))
            .await
            .map_err(|s| self.fail(s))?
            .into_inner();
        let boost = response.boost.unwrap_or_default();
        if format != Format::Table {
            return print_boosts(std::slice::from_ref(&boost), format);
        }
        // The id alone on stdout, so `id=$(bh boost request ...)` works;
        // the sentence for people on stderr.
        out!("{}", boost.boost_id);
        let view = BoostView::from(&boost);
        eprintln!(
            "{} {} {} boost for {} from node {}, {}; expires {} (in {})",
            view.status,
            view.amount_text,
            view.resource,
            view.target,
            view.source,
            if boost.enforced_on_host {
                "applied to the container's limits"
            } else {
                "in the capacity ledger and scheduler"
            },
            view.expires_at,
            view.remaining
        );
        for id in &response.preempted_boost_ids {
            eprintln!("preempted boost {id}");
        }
        Ok(())
    }

    pub async fn boost_status(
        &self,
        node: Option<String>,
        all: bool,
        format: Format,
    ) -> Result<(), CliError> {
        let boosts = BoostServiceClient::new(self.channel())
            .list_boosts(pb::ListBoostsRequest {
                node_id: node.unwrap_or_default(),
                include_ended: all,
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .boosts;
        print_boosts(&boosts, format)
    }

    pub async fn boost_get(&self, id: &str, format: Format) -> Result<(), CliError> {
        let boost = BoostServiceClient::new(self.channel())
            .get_boost(pb::GetBoostRequest {
                boost_id: id.to_owned(),
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .boost
            .unwrap_or_default();
        print_boosts(std::slice::from_ref(&boost), format)
    }

    pub async fn boost_release(
        &self,
        id: &str,
        request_id: Option<String>,
        format: Format,
    ) -> Result<(), CliError> {
        let boost = BoostServiceClient::new(self.channel())
            .release_boost(with_request_id(
                pb::ReleaseBoostRequest {
                    boost_id: id.to_owned(),
                    request_id: request_id.clone().unwrap_or_default(),
                },
                request_id.as_deref().unwrap_or_default(),
            ))
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .boost
            .unwrap_or_default();
        if format != Format::Table {
            return print_boosts(std::slice::from_ref(&boost), format);
        }
        let view = BoostView::from(&boost);
        out!(
            "boost {} released ({} {} for {})",
            view.id,
            view.amount_text,
            view.resource,
            view.target
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_read_the_way_operators_write_them() {
        use pb::boost_target::Target;
        let t = |s: &str| parse_target(s).unwrap().target.unwrap();
        assert_eq!(t("gpu-1"), Target::NodeId("gpu-1".into()));
        assert_eq!(t("node/a"), Target::NodeId("a".into()));
        let id = "0190f3a4-0000-7000-8000-000000000001";
        assert_eq!(t(id), Target::ContainerId(id.into()));
        assert_eq!(
            t(&format!("container/{id}")),
            Target::ContainerId(id.into())
        );
        assert_eq!(
            t("tenant/t1/sandbox"),
            Target::Tenant(pb::TenantTarget {
                tenant_id: "t1".into(),
                workload_id: "sandbox".into()
            })
        );
        assert!(parse_target("tenant/t1").is_err());
        assert!(parse_target("t1/sandbox").is_err());
    }

    #[test]
    fn amounts_read_in_their_units_and_bad_numbers_reach_the_server() {
        assert_eq!(parse_amount(BoostResource::Cpu, "1.5").unwrap(), 1.5);
        assert_eq!(parse_amount(BoostResource::Cpu, "500m").unwrap(), 0.5);
        assert_eq!(
            parse_amount(BoostResource::Memory, "512M").unwrap(),
            (512u64 << 20) as f64
        );
        assert_eq!(parse_amount(BoostResource::Gpu, "1").unwrap(), 1.0);
        assert!(parse_amount(BoostResource::Cpu, "-1").unwrap() < 0.0);
        assert!(parse_amount(BoostResource::Cpu, "NaN").unwrap().is_nan());
        assert!(parse_amount(BoostResource::Cpu, "lots").is_err());
        assert!(parse_amount(BoostResource::Memory, "2X").is_err());
    }
}
