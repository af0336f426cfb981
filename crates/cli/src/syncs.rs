//! bh sync: status, trigger, watch; and bh node drain.

use std::time::Duration;

use serde::Serialize;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::node_service_client::NodeServiceClient;
use boilerhouse_proto::pb::sync_service_client::SyncServiceClient;

use crate::client::{CliError, Client};
use crate::output::{self, Format, print_structured, print_table, table};

#[derive(Serialize)]
struct SyncView {
    tenant: String,
    workload: String,
    mapping: String,
    state: String,
    last_sync_at: String,
    pending: u32,
    lag: String,
    lag_seconds: f64,
    bytes: u64,
    /// Why the state is `warning`.
    #[serde(skip_serializing_if = "String::is_empty")]
    warning: String,
    errors: Vec<SyncErrorView>,
}

#[derive(Serialize)]
struct SyncErrorView {
    at: String,
    mapping: String,
    message: String,
}

impl From<&pb::SyncStatus> for SyncView {
    fn from(s: &pb::SyncStatus) -> Self {
        let lag = s
            .lag
            .as_ref()
            .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
            .unwrap_or_default();
        Self {
            tenant: s.tenant_id.clone(),
            workload: s.workload_id.clone(),
            mapping: s.sync_id.clone(),
            state: pb::SyncState::try_from(s.state)
                .map(|st| {
                    st.as_str_name()
                        .trim_start_matches("SYNC_STATE_")
                        .to_ascii_lowercase()
                })
                .unwrap_or_default(),
            last_sync_at: output::time(s.last_sync_at.as_ref()),
            pending: s.pending_count,
            lag: if lag.is_zero() {
                "-".into()
            } else {
                output::short_duration(lag)
            },
            lag_seconds: lag.as_secs_f64(),
            bytes: s.bytes_transferred,
            warning: s.warning.clone(),
            errors: s
                .recent_errors
                .iter()
                .map(|e| SyncErrorView {
                    at: output::time(e.at.as_ref()),
                    mapping: e.mapping.clone(),
                    message: e.message.clone(),
                })
                .collect(),
        }
    }
}

fn print_statuses(statuses: &[pb::SyncStatus], format: Format) -> Result<(), CliError> {
    let views: Vec<SyncView> = statuses.iter().map(SyncView::from).collect();
    if format != Format::Table {
        return print_structured(format, &views).map_err(CliError::Output);
    }
    if views.is_empty() {
        out!("No syncs yet.");
        return Ok(());
    }
    let mut t = table(&[
        "TENANT",
        "WORKLOAD",
        "MAPPING",
        "STATE",
        "LAST SYNC",
        "PENDING",
        "LAG",
        "BYTES",
        "NOTE",
    ]);
    for v in &views {
        t.add_row(vec![
            v.tenant.clone(),
            v.workload.clone(),
            v.mapping.clone(),
            v.state.clone(),
            v.last_sync_at.clone(),
            v.pending.to_string(),
            v.lag.clone(),
            v.bytes.to_string(),
            // A warning is the current state's reason; errors are
            // history, shown when the last run failed.
            if v.warning.is_empty() {
                v.errors
                    .last()
                    .filter(|_| v.state != "ok")
                    .map(|e| format!("{} {}", e.at, e.message))
                    .unwrap_or_default()
            } else {
                v.warning.clone()
            },
        ]);
    }
    print_table(&t);
    Ok(())
}

/// `upload`, `download`, `bidirectional`, or none for each mapping's own.
pub fn parse_direction(s: Option<&str>) -> Result<pb::SyncDirection, CliError> {
    Ok(match s {
        None => pb::SyncDirection::Unspecified,
        Some("upload") => pb::SyncDirection::Upload,
        Some("download") => pb::SyncDirection::Download,
        Some("bidirectional") => pb::SyncDirection::Bidirectional,
        Some(other) => {
            return Err(CliError::Input(format!(
                "--direction {other:?}: use upload, download or bidirectional"
            )));
        }
    })
}

impl Client {
    pub async fn sync_status(
        &self,
        tenant: Option<String>,
        workload: Option<String>,
        format: Format,
    ) -> Result<(), CliError> {
        let statuses = SyncServiceClient::new(self.channel())
            .get_sync_status(pb::GetSyncStatusRequest {
                tenant_id: tenant.unwrap_or_default(),
                workload_id: workload.unwrap_or_default(),
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .statuses;
        print_statuses(&statuses, format)
    }

    pub async fn sync_trigger(
        &self,
        tenant: &str,
        workload: &str,
        direction: Option<&str>,
        format: Format,
    ) -> Result<(), CliError> {
        let statuses = SyncServiceClient::new(self.channel())
            .trigger_sync(pb::TriggerSyncRequest {
                tenant_id: tenant.to_owned(),
                workload_id: workload.to_owned(),
                direction: parse_direction(direction)? as i32,
                request_id: String::new(),
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .statuses;
        print_statuses(&statuses, format)
    }

    pub async fn sync_watch(
        &self,
        tenant: Option<String>,
        workload: Option<String>,
        format: Format,
    ) -> Result<(), CliError> {
        let mut stream = SyncServiceClient::new(self.channel())
            .watch_sync_status(pb::WatchSyncStatusRequest {
                tenant_id: tenant.unwrap_or_default(),
                workload_id: workload.unwrap_or_default(),
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner();
        while let Some(item) = stream.message().await.map_err(|s| self.fail(s))? {
            let status = item.status.unwrap_or_default();
            let view = SyncView::from(&status);
            if format == Format::Table {
                out!(
                    "{} {}/{} {} {} pending={} bytes={}",
                    view.last_sync_at,
                    view.tenant,
                    view.workload,
                    view.mapping,
                    view.state,
                    view.pending,
                    view.bytes
                );
            } else {
                print_structured(format, &view).map_err(CliError::Output)?;
            }
        }
        Ok(())
    }

    pub async fn node_drain(
        &self,
        node: &str,
        deadline: Option<Duration>,
        format: Format,
    ) -> Result<(), CliError> {
        let deadline = deadline.map(|d| {
            let at = std::time::SystemTime::now() + d;
            let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            prost_types::Timestamp {
                seconds: since.as_secs() as i64,
                nanos: since.subsec_nanos() as i32,
            }
        });
        let mut stream = NodeServiceClient::new(self.channel())
            .drain_node(pb::DrainNodeRequest {
                node_id: node.to_owned(),
                deadline,
                request_id: String::new(),
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner();
        let mut drained = false;
        while let Some(step) = stream.message().await.map_err(|s| self.fail(s))? {
            if format == Format::Table {
                out!(
                    "{} (containers left: {}, claims left: {})",
                    step.message,
                    step.containers_remaining,
                    step.claims_remaining
                );
            } else {
                #[derive(Serialize)]
                struct Step<'a> {
                    message: &'a str,
                    containers_remaining: u32,
                    claims_remaining: u32,
                    done: bool,
                }
                print_structured(
                    format,
                    &Step {
                        message: &step.message,
                        containers_remaining: step.containers_remaining,
                        claims_remaining: step.claims_remaining,
                        done: step.done,
                    },
                )
                .map_err(CliError::Output)?;
            }
            drained = step.done && step.containers_remaining == 0;
        }
        if drained {
            Ok(())
        } else {
            Err(CliError::Input(format!(
                "node {node} is not fully drained; see the messages above"
            )))
        }
    }
}
