//! bh reconcile: what reconciliation would do now, and doing it.

use std::time::Duration;

use serde::Serialize;

use boilerhouse_proto::pb;

use crate::client::{CliError, Client};
use crate::output::{self, Format, print_structured, print_table, table};

#[derive(Serialize)]
struct ActionView {
    action: String,
    node: String,
    container: String,
    docker_id: String,
    workload: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    tenant: String,
    reason: String,
    due: String,
}

impl Client {
    pub async fn reconcile_plan(
        &self,
        node: Option<String>,
        format: Format,
    ) -> Result<(), CliError> {
        let actions = pb::reconcile_service_client::ReconcileServiceClient::new(self.channel())
            .plan_reconcile(pb::PlanReconcileRequest {
                node_id: node.unwrap_or_default(),
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .actions;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let views: Vec<ActionView> = actions
            .iter()
            .map(|a| ActionView {
                action: a.kind.clone(),
                node: a.node_id.clone(),
                container: a.container_id.clone(),
                docker_id: a.docker_id.chars().take(12).collect(),
                workload: a.workload_id.clone(),
                tenant: a.tenant_id.clone(),
                reason: a.reason.clone(),
                due: match &a.not_before {
                    Some(t) if t.seconds > now => format!(
                        "in {}",
                        output::short_duration(Duration::from_secs((t.seconds - now) as u64))
                    ),
                    _ => "now".into(),
                },
            })
            .collect();
        if format != Format::Table {
            return print_structured(format, &views).map_err(CliError::Output);
        }
        if views.is_empty() {
            out!("Nothing to do: the database and the agents' reports agree.");
            return Ok(());
        }
        let mut t = table(&["ACTION", "NODE", "CONTAINER", "WORKLOAD", "DUE", "REASON"]);
        for v in &views {
            t.add_row(vec![
                v.action.clone(),
                v.node.clone(),
                v.container.clone(),
                v.workload.clone(),
                v.due.clone(),
                v.reason.clone(),
            ]);
        }
        print_table(&t);
        Ok(())
    }

    pub async fn reconcile_apply(
        &self,
        node: Option<String>,
        format: Format,
    ) -> Result<(), CliError> {
        let results = pb::reconcile_service_client::ReconcileServiceClient::new(self.channel())
            .apply_reconcile(pb::ApplyReconcileRequest {
                node_id: node.unwrap_or_default(),
                request_id: String::new(),
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .results;
        #[derive(Serialize)]
        struct ResultView {
            action: String,
            node: String,
            container: String,
            ok: bool,
            /// Done, but the state had moved on: nothing was left to do.
            moot: bool,
            #[serde(skip_serializing_if = "String::is_empty")]
            error: String,
            reason: String,
        }
        let views: Vec<ResultView> = results
            .iter()
            .map(|r| {
                let a = r.action.clone().unwrap_or_default();
                ResultView {
                    action: a.kind,
                    node: a.node_id,
                    container: a.container_id,
                    ok: r.ok,
                    moot: r.moot,
                    error: r.error.clone(),
                    reason: a.reason,
                }
            })
            .collect();
        if format != Format::Table {
            return print_structured(format, &views).map_err(CliError::Output);
        }
        if views.is_empty() {
            out!("Nothing was due.");
            return Ok(());
        }
        let mut t = table(&["ACTION", "NODE", "CONTAINER", "RESULT", "REASON"]);
        for v in &views {
            let result = if v.ok && v.moot {
                "moot (the state moved on since the plan)".to_owned()
            } else if v.ok {
                "done".to_owned()
            } else {
                format!("failed: {}", v.error)
            };
            t.add_row(vec![
                v.action.clone(),
                v.node.clone(),
                v.container.clone(),
                result,
                v.reason.clone(),
            ]);
        }
        print_table(&t);
        Ok(())
    }
}
