//! bh workload: list, get, apply, delete.

use serde::Serialize;

use boilerhouse_proto::pb;

use crate::client::{CliError, Client};
use crate::failover::with_request_id;
use crate::output::{self, Format, print_structured, print_table, table};
use boilerhouse_proto::pb::workload_service_client::WorkloadServiceClient;

impl Client {
    pub async fn workload_list(&self, format: Format) -> Result<(), CliError> {
        let resp = WorkloadServiceClient::new(self.channel())
            .list_workloads(pb::ListWorkloadsRequest {})
            .await
            .map_err(|s| self.fail(s))?
            .into_inner();
        let workloads: Vec<WorkloadView> = resp.workloads.iter().map(WorkloadView::from).collect();
        let errors: Vec<LoadErrorView> = resp.load_errors.iter().map(LoadErrorView::from).collect();
        if format != Format::Table {
            #[derive(Serialize)]
            struct Listing<'a> {
                workloads: &'a [WorkloadView],
                load_errors: &'a [LoadErrorView],
            }
            return print_structured(
                format,
                &Listing {
                    workloads: &workloads,
                    load_errors: &errors,
                },
            )
            .map_err(CliError::Output);
        }
        let mut t = table(&[
            "ID",
            "IMAGE",
            "MIN",
            "MAX",
            "IDLE TIMEOUT",
            "AFFINITY",
            "SOURCE",
            "AGE",
        ]);
        for (w, raw) in workloads.iter().zip(&resp.workloads) {
            t.add_row(vec![
                w.id.clone(),
                w.image.clone(),
                w.min_size.to_string(),
                w.max_size.to_string(),
                if w.idle_timeout.is_empty() {
                    "-".into()
                } else {
                    w.idle_timeout.clone()
                },
                w.affinity_timeout.clone(),
                w.source.clone(),
                output::age(raw.updated_at.as_ref()),
            ]);
        }
        if workloads.is_empty() {
            out!("No workloads.");
        } else {
            print_table(&t);
        }
        for e in &errors {
            let field = if e.field.is_empty() {
                String::new()
            } else {
                format!(" field `{}`:", e.field)
            };
            eprintln!("warning: {} failed to load:{field} {}", e.path, e.reason);
        }
        Ok(())
    }

    pub async fn workload_get(&self, id: &str, format: Format) -> Result<(), CliError> {
        let resp = WorkloadServiceClient::new(self.channel())
            .get_workload(pb::GetWorkloadRequest {
                workload_id: id.to_owned(),
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner();
        let w = resp.workload.unwrap_or_default();
        self.print_workload(&w, format)
    }

    fn print_workload(&self, w: &pb::Workload, format: Format) -> Result<(), CliError> {
        let view = WorkloadView::from(w);
        if format != Format::Table {
            return print_structured(format, &view).map_err(CliError::Output);
        }
        let rows = [
            ("ID", view.id.clone()),
            ("Name", view.name.clone()),
            ("Image", view.image.clone()),
            (
                "Pool",
                format!("min {} / max {}", view.min_size, view.max_size),
            ),
            (
                "Idle timeout",
                if view.idle_timeout.is_empty() {
                    "none".into()
                } else {
                    view.idle_timeout.clone()
                },
            ),
            ("Affinity timeout", view.affinity_timeout.clone()),
            ("Source", view.source.clone()),
            ("Spec hash", view.spec_hash.clone()),
            ("Updated", view.updated_at.clone()),
        ];
        for (k, v) in rows {
            out!("{:<17} {v}", format!("{k}:"));
        }
        out!("YAML:");
        for line in w.yaml.lines() {
            out!("  {line}");
        }
        Ok(())
    }

    pub async fn workload_apply(
        &self,
        yaml: String,
        dry_run: bool,
        request_id: String,
        format: Format,
    ) -> Result<(), CliError> {
        let resp = WorkloadServiceClient::new(self.channel())
            .apply_workload(with_request_id(
                pb::ApplyWorkloadRequest {
                    yaml,
                    dry_run,
                    request_id: request_id.clone(),
                },
                &request_id,
            ))
            .await
            .map_err(|s| self.fail(s))?
            .into_inner();
        let w = resp.workload.unwrap_or_default();
        if format != Format::Table {
            return print_structured(format, &WorkloadView::from(&w)).map_err(CliError::Output);
        }
        let outcome = match pb::ApplyOutcome::try_from(resp.outcome) {
            Ok(pb::ApplyOutcome::Created) => "created",
            Ok(pb::ApplyOutcome::Updated) => "configured",
            Ok(pb::ApplyOutcome::Unchanged) => "unchanged",
            Ok(pb::ApplyOutcome::Valid) => "valid (dry run)",
            _ => "applied",
        };
        out!("workload/{} {outcome}", w.id);
        Ok(())
    }

    pub async fn workload_delete(
        &self,
        id: &str,
        request_id: String,
        format: Format,
    ) -> Result<(), CliError> {
        let resp = WorkloadServiceClient::new(self.channel())
            .delete_workload(with_request_id(
                pb::DeleteWorkloadRequest {
                    workload_id: id.to_owned(),
                    request_id: request_id.clone(),
                },
                &request_id,
            ))
            .await
            .map_err(|s| self.fail(s))?
            .into_inner();
        let w = resp.workload.unwrap_or_default();
        if format != Format::Table {
            return print_structured(format, &WorkloadView::from(&w)).map_err(CliError::Output);
        }
        out!("workload/{} deleted", w.id);
        Ok(())
    }
}

#[derive(Serialize)]
struct WorkloadView {
    id: String,
    name: String,
    image: String,
    min_size: u32,
    max_size: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    idle_timeout: String,
    affinity_timeout: String,
    source: String,
    spec_hash: String,
    updated_at: String,
}

impl From<&pb::Workload> for WorkloadView {
    fn from(w: &pb::Workload) -> Self {
        let pool = w.pool.unwrap_or_default();
        Self {
            id: w.id.clone(),
            name: w.name.clone(),
            image: w.image.clone(),
            min_size: pool.min_size,
            max_size: pool.max_size,
            idle_timeout: output::duration(pool.idle_timeout.as_ref()),
            affinity_timeout: output::duration(pool.affinity_timeout.as_ref()),
            source: w.source_path.clone(),
            spec_hash: w.spec_hash.clone(),
            updated_at: output::time(w.updated_at.as_ref()),
        }
    }
}

#[derive(Serialize)]
struct LoadErrorView {
    path: String,
    field: String,
    reason: String,
}

impl From<&pb::WorkloadLoadError> for LoadErrorView {
    fn from(e: &pb::WorkloadLoadError) -> Self {
        Self {
            path: e.path.clone(),
            field: e.field.clone(),
            reason: e.reason.clone(),
        }
    }
}
