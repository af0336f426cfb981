//! bh affinity: the containers kept for tenants who released them.

use std::time::Duration;

use serde::Serialize;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::affinity_service_client::AffinityServiceClient;

use crate::client::{CliError, Client};
use crate::output::{self, Format, print_structured, print_table, table};
use crate::pools::prost_duration;

#[derive(Serialize)]
struct ReservationView {
    tenant: String,
    workload: String,
    container: String,
    node: String,
    expires_at: String,
    remaining: String,
    /// Why it outlives its expiry (an owed upload).
    #[serde(skip_serializing_if = "String::is_empty")]
    held: String,
}

impl From<&pb::Reservation> for ReservationView {
    fn from(r: &pb::Reservation) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let remaining = r
            .expires_at
            .as_ref()
            .map(|t| (t.seconds - now).max(0) as u64)
            .unwrap_or(0);
        Self {
            tenant: r.tenant_id.clone(),
            workload: r.workload_id.clone(),
            container: r.container_id.clone(),
            node: r.node_id.clone(),
            expires_at: output::time(r.expires_at.as_ref()),
            remaining: if r.held.is_empty() {
                output::short_duration(Duration::from_secs(remaining))
            } else {
                "held".into()
            },
            held: r.held.clone(),
        }
    }
}

impl Client {
    pub async fn affinity_list(&self, format: Format) -> Result<(), CliError> {
        let list = AffinityServiceClient::new(self.channel())
            .list_reservations(pb::ListReservationsRequest::default())
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .reservations;
        let views: Vec<ReservationView> = list.iter().map(ReservationView::from).collect();
        if format != Format::Table {
            return print_structured(format, &views).map_err(CliError::Output);
        }
        if views.is_empty() {
            out!("No reservations.");
            return Ok(());
        }
        let mut t = table(&[
            "TENANT",
            "WORKLOAD",
            "CONTAINER",
            "NODE",
            "EXPIRES",
            "REMAINING",
            "HELD",
        ]);
        for v in &views {
            t.add_row(vec![
                v.tenant.clone(),
                v.workload.clone(),
                v.container.clone(),
                v.node.clone(),
                v.expires_at.clone(),
                v.remaining.clone(),
                v.held.clone(),
            ]);
        }
        print_table(&t);
        Ok(())
    }

    pub async fn affinity_extend(
        &self,
        tenant: &str,
        workload: &str,
        by: Duration,
        format: Format,
    ) -> Result<(), CliError> {
        let r = AffinityServiceClient::new(self.channel())
            .extend_reservation(pb::ExtendReservationRequest {
                tenant_id: tenant.into(),
                workload_id: workload.into(),
                extend_by: Some(prost_duration(by)),
                request_id: String::new(),
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .reservation
            .unwrap_or_default();
        let view = ReservationView::from(&r);
        if format != Format::Table {
            return print_structured(format, &view).map_err(CliError::Output);
        }
        out!(
            "reservation of {} for {} now expires at {}",
            view.tenant,
            view.workload,
            view.expires_at
        );
        Ok(())
    }

    pub async fn affinity_revoke(
        &self,
        tenant: &str,
        workload: &str,
        format: Format,
    ) -> Result<(), CliError> {
        let r = AffinityServiceClient::new(self.channel())
            .revoke_reservation(pb::RevokeReservationRequest {
                tenant_id: tenant.into(),
                workload_id: workload.into(),
                request_id: String::new(),
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .reservation
            .unwrap_or_default();
        let view = ReservationView::from(&r);
        if format != Format::Table {
            return print_structured(format, &view).map_err(CliError::Output);
        }
        out!(
            "reservation of {} for {} revoked; container {} will be destroyed",
            view.tenant,
            view.workload,
            view.container
        );
        Ok(())
    }
}
