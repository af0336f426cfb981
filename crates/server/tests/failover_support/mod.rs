//! What the failover tests share on top of `chaos_support`: tenants
//! sending to every replica, and waiting on what they were told.

use std::time::{Duration, Instant};

use boilerhouse_testkit::eventually;
use boilerhouse_testkit::replicas::Replicas;

use super::chaos_support::traffic::{Answer, CallKind, Servers, Traffic};

/// How long a wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(60);

/// Every replica, for tenants that follow the leader among them.
pub fn servers(replicas: &Replicas) -> Servers {
    Servers::new((0..replicas.len()).map(|i| {
        (
            replicas.server(i).url(),
            replicas.lazy_channel(i).expect("a channel to a replica"),
        )
    }))
}

/// Waits for the first claim acknowledged among those sent at or after
/// `since` (to a server other than `besides`), and returns how long after
/// `since` it was answered.
pub async fn first_claim_since(
    traffic: &Traffic,
    since: Instant,
    besides: Option<usize>,
    replicas: &Replicas,
) -> Duration {
    eventually(WAIT, "a claim acknowledged after the fault", || async {
        traffic
            .recorded()
            .calls
            .iter()
            .filter(|c| c.kind == CallKind::Claim && c.answer == Answer::Ok)
            .filter(|c| c.started >= since && Some(c.server) != besides)
            .map(|c| c.ended - since)
            .min()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", replicas.logs()))
}

/// Waits until `more` claims were acknowledged on top of those so far:
/// traffic flows before the next fault.
pub async fn claims_flow(traffic: &Traffic, more: usize, replicas: &Replicas) {
    let before = traffic.recorded().claims_acked();
    eventually(WAIT, "claims to flow", || async {
        (traffic.recorded().claims_acked() >= before + more).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", replicas.logs()));
}
