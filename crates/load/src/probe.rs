//! `--until-granted`: how long until a server (say one just restarted)
//! grants a claim. One tenant claims every 10 ms, each call with a short
//! deadline, on a channel that connects lazily, so the probe can start
//! before the server listens; the first grant ends it, and is released.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::claim_service_client::ClaimServiceClient;
use boilerhouse_proto::tls::BearerToken;

/// What the probe saw.
#[derive(Debug, Serialize)]
pub struct ProbeReport {
    /// Milliseconds from the probe's start to the first granted claim.
    pub granted_after_ms: Option<f64>,
    pub attempts: u64,
    /// Answers before the grant, by status code.
    pub refusals: BTreeMap<String, u64>,
    /// Where the granted claim came from (POOL, ...).
    pub source: Option<String>,
}

pub async fn until_granted(
    channel: InterceptedService<Channel, BearerToken>,
    tenant: &str,
    workload: &str,
    give_up: Duration,
) -> ProbeReport {
    let mut client = ClaimServiceClient::new(channel);
    let began = Instant::now();
    let mut report = ProbeReport {
        granted_after_ms: None,
        attempts: 0,
        refusals: BTreeMap::new(),
        source: None,
    };
    while began.elapsed() < give_up {
        report.attempts += 1;
        let mut request = tonic::Request::new(pb::ClaimRequest {
            tenant_id: tenant.to_owned(),
            workload_id: workload.to_owned(),
            ..Default::default()
        });
        request.set_timeout(Duration::from_millis(500));
        match client.claim(request).await {
            Ok(answer) => {
                report.granted_after_ms = Some(began.elapsed().as_secs_f64() * 1000.0);
                let claim = answer.into_inner().claim.unwrap_or_default();
                report.source = pb::ClaimSource::try_from(claim.source)
                    .ok()
                    .map(|s| s.as_str_name().to_owned());
                let _ = client
                    .release(pb::ReleaseRequest {
                        tenant_id: tenant.to_owned(),
                        workload_id: workload.to_owned(),
                        generation: claim.generation,
                        request_id: String::new(),
                    })
                    .await;
                break;
            }
            Err(status) => {
                *report
                    .refusals
                    .entry(format!("{:?}", status.code()))
                    .or_default() += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    report
}
