//! bh events: the activity log, listed or followed.

use tokio_stream::StreamExt as _;

use serde::Serialize;

use boilerhouse_proto::pb;

use crate::client::{CliError, Client};
use crate::output::{self, Format, print_structured, print_table, table};
use boilerhouse_proto::pb::event_service_client::EventServiceClient;

use crate::EventsArgs;

impl Client {
    pub async fn events(&self, args: EventsArgs, format: Format) -> Result<(), CliError> {
        let min_severity = match args.severity.as_deref() {
            None => pb::EventSeverity::Unspecified,
            Some("info") => pb::EventSeverity::Info,
            Some("warning") => pb::EventSeverity::Warning,
            Some("error") => pb::EventSeverity::Error,
            Some(other) => {
                return Err(CliError::Input(format!(
                    "--severity {other:?} is not one of info, warning, error"
                )));
            }
        };
        let filter = pb::EventFilter {
            kinds: args.kinds.clone(),
            node_id: args.node.clone().unwrap_or_default(),
            workload_id: args.workload.clone().unwrap_or_default(),
            container_id: args.container.clone().unwrap_or_default(),
            tenant_id: args.tenant.clone().unwrap_or_default(),
            boost_id: String::new(),
            min_severity: min_severity as i32,
        };
        let mut client = EventServiceClient::new(self.channel());
        let listed = client
            .list_events(pb::ListEventsRequest {
                filter: Some(filter.clone()),
                after_id: 0,
                since: None,
                limit: args.limit.clamp(1, 1000),
                latest: true,
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner();
        let views: Vec<EventView> = listed.events.iter().map(EventView::from).collect();
        if !args.follow {
            if format != Format::Table {
                return print_structured(format, &views).map_err(CliError::Output);
            }
            if views.is_empty() {
                out!("No events.");
                return Ok(());
            }
            let mut t = table(&["ID", "TIME", "SEVERITY", "KIND", "SUBJECT", "MESSAGE"]);
            for e in &views {
                t.add_row(vec![
                    e.id.to_string(),
                    e.at.clone(),
                    e.severity.clone(),
                    e.kind.clone(),
                    e.subject(),
                    e.message.clone(),
                ]);
            }
            print_table(&t);
            return Ok(());
        }

        // Follow: print what was listed, then stream from the last id seen so
        // nothing between the listing and the watch is missed.
        if format == Format::Table {
            out!(
                "{:<8} {:<20} {:<8} {:<20} {:<24} MESSAGE",
                "ID",
                "TIME",
                "SEVERITY",
                "KIND",
                "SUBJECT"
            );
        }
        for e in &views {
            print_event_line(e, format)?;
        }
        let last = listed.events.last().map(|e| e.id).unwrap_or(0);
        let resume_token = if last == 0 {
            String::new()
        } else {
            last.to_string()
        };
        let mut stream = client
            .watch_events(pb::WatchEventsRequest {
                filter: Some(filter),
                resume_token,
            })
            .await
            .map_err(|s| self.fail(s))?
            .into_inner();
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(msg)) => {
                        if let Some(e) = msg.event {
                            print_event_line(&EventView::from(&e), format)?;
                        }
                    }
                    Some(Err(status)) => return Err(self.fail(status)),
                    None => {
                        eprintln!("bh: the server closed the event stream (it is shutting down)");
                        return Ok(());
                    }
                },
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    }
}

fn print_event_line(e: &EventView, format: Format) -> Result<(), CliError> {
    match format {
        Format::Table => {
            out!(
                "{:<8} {:<20} {:<8} {:<20} {:<24} {}",
                e.id,
                e.at,
                e.severity,
                e.kind,
                e.subject(),
                e.message
            );
        }
        // One object per line, so a follow stream is valid NDJSON.
        Format::Json => out!(
            "{}",
            serde_json::to_string(e).map_err(|x| CliError::Output(x.to_string()))?
        ),
        Format::Yaml => {
            out!("---");
            print_structured(Format::Yaml, e).map_err(CliError::Output)?;
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct EventView {
    id: u64,
    at: String,
    severity: String,
    kind: String,
    message: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    node_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    workload_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    container_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    tenant_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    boost_id: String,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    attributes: std::collections::BTreeMap<String, String>,
}

impl EventView {
    fn subject(&self) -> String {
        let parts = [
            ("node", &self.node_id),
            ("workload", &self.workload_id),
            ("container", &self.container_id),
            ("tenant", &self.tenant_id),
            ("boost", &self.boost_id),
        ];
        let named: Vec<String> = parts
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| format!("{k}/{v}"))
            .collect();
        if named.is_empty() {
            "-".into()
        } else {
            named.join(",")
        }
    }
}

impl From<&pb::Event> for EventView {
    fn from(e: &pb::Event) -> Self {
        let severity = match pb::EventSeverity::try_from(e.severity) {
            Ok(pb::EventSeverity::Warning) => "warning",
            Ok(pb::EventSeverity::Error) => "error",
            _ => "info",
        };
        Self {
            id: e.id,
            at: output::time(e.at.as_ref()),
            severity: severity.to_owned(),
            kind: e.kind.clone(),
            message: e.message.clone(),
            node_id: e.node_id.clone(),
            workload_id: e.workload_id.clone(),
            container_id: e.container_id.clone(),
            tenant_id: e.tenant_id.clone(),
            boost_id: e.boost_id.clone(),
            attributes: e.attributes.clone().into_iter().collect(),
        }
    }
}
