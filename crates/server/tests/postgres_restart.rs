//! PostgreSQL restarted under claim traffic: `boilerhoused` on a private
//! PostgreSQL server of this test's own (`boilerhouse_testkit::postgres`),
//! a real agent, and tenants claiming, touching and releasing. The
//! database is restarted (`pg_ctl restart -m fast`, every session ended
//! mid-transaction), then crashed (`pg_ctl stop -m immediate`) and
//! started again after a while. Meanwhile every call is answered within
//! the client's deadline, and what fails fails with UNAVAILABLE (or a
//! refusal that says why), never INTERNAL; reads and writes sent while
//! the database is down do too. Afterwards claims are acknowledged again
//! by the same `boilerhoused` process, and the history checker finds
//! every acknowledged claim and release in the database.
//!
//! Prints how long each outage lasted and how long after it the first
//! claim was acknowledged, and what the server did: reopen its write
//! connection, or step down and restore (a COMMIT whose outcome it could
//! not know).
//!
//! Needs Docker and PostgreSQL's binaries (`apt-get install postgresql`);
//! skipped without either unless `BOILERHOUSE_REQUIRE_POSTGRES=1` (or
//! `BOILERHOUSE_REQUIRE_DOCKER=1`).

mod chaos_support;
mod failover_support;

use std::time::{Duration, Instant};

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::event_service_client::EventServiceClient;
use boilerhouse_proto::pb::pool_service_client::PoolServiceClient;
use boilerhouse_testkit::docker::{require_docker, test_image};
use boilerhouse_testkit::eventually;
use boilerhouse_testkit::postgres::{PrivatePostgres, StopMode};
use boilerhouse_testkit::replicas::Replicas;
use tonic::Code;

use chaos_support::traffic::{Answer, Traffic, TrafficOptions};
use chaos_support::{Subject, Verdict, check, converge};
use failover_support::{WAIT, claims_flow, first_claim_since, servers};

const TENANTS: usize = 6;

/// A lease longer than a restart, so that a restart alone does not cost
/// the server its leadership: what is left is the store's own way back.
const CONFIG: &str = r#"
leader_lease = "10s"
heartbeat_interval = "200ms"
suspect_after = "5s"
restart_grace = "10s"
reconcile_interval = "500ms"
reconcile_lost_grace = "5s"
reconcile_creation_grace = "3s"
"#;

/// How long a tenant waits for any answer.
const DEADLINE: Duration = Duration::from_secs(15);

/// A read and a write sent while the database is down: each is answered
/// within the deadline, and not with INTERNAL.
async fn calls_while_down(replicas: &Replicas) -> String {
    let channel = replicas.lazy_channel(0).unwrap();
    let read = tokio::time::timeout(
        DEADLINE,
        EventServiceClient::new(channel.clone()).list_events(pb::ListEventsRequest::default()),
    )
    .await
    .expect("a read is answered while the database is down");
    let write = tokio::time::timeout(
        DEADLINE,
        PoolServiceClient::new(channel).scale_pool(pb::ScalePoolRequest {
            pool_id: "demo".into(),
            min_size: Some(3),
            max_size: None,
            request_id: String::new(),
        }),
    )
    .await
    .expect("a write is answered while the database is down");
    let write = write.expect_err("no write is acknowledged while the database is down");
    assert_eq!(write.code(), Code::Unavailable, "{write:?}");
    let read = read.expect_err("the events are in the database, which is down");
    assert_eq!(read.code(), Code::Unavailable, "{read:?}");
    format!("read: {}; write: {}", read.message(), write.message())
}

#[tokio::test]
async fn claims_come_back_after_postgres_restarts_and_crashes_under_load() {
    let Some(postgres) = PrivatePostgres::start().await.unwrap() else {
        return;
    };
    let Some(docker) = require_docker().await else {
        return;
    };
    let image = test_image(&docker).await.unwrap();
    let workload = format!(
        "id: demo\nimage: {image}\ncommand: [sleep, infinity]\nvolumes: {{state: {{target: /state}}}}\n\
         pool: {{min_size: 3, max_size: 12, affinity_timeout: 2s, fill_concurrency: 4}}\n"
    );
    let mut replicas = Replicas::start(
        &docker,
        &postgres.url(),
        &["solo"],
        CONFIG,
        &[("demo", workload)],
    )
    .await
    .unwrap();
    replicas.add_agent("pg-restart").unwrap();
    replicas.leader(&[], WAIT).await.unwrap();
    let pid = replicas.server(0).pid();
    converge(&replicas.lazy_channel(0).unwrap(), 1, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", replicas.logs()));

    let traffic = Traffic::start(
        &servers(&replicas),
        TENANTS,
        TrafficOptions {
            acquire_timeout: Duration::from_secs(5),
            deadline: DEADLINE,
        },
    );
    let mut outages = Vec::new();

    // A restart: every session is ended, whatever it was doing.
    claims_flow(&traffic, 10, &replicas).await;
    let restarting = Instant::now();
    postgres.restart(StopMode::Fast).await.unwrap();
    let down = restarting.elapsed();
    let back = first_claim_since(&traffic, Instant::now(), None, &replicas).await;
    println!(
        "PostgreSQL restarted (-m fast) under load: down {down:.2?} (pg_ctl restart), \
         the first claim {back:.2?} after it was back"
    );
    outages.push((restarting, restarting + down));

    // A crash, and the database stays down until calls have failed.
    claims_flow(&traffic, 10, &replicas).await;
    let crashed = Instant::now();
    postgres.stop(StopMode::Immediate).await.unwrap();
    let refused = eventually(WAIT, "calls to fail while the database is down", || async {
        let failed = traffic
            .recorded()
            .calls
            .iter()
            .filter(|c| c.started >= crashed)
            .filter(|c| {
                matches!(
                    c.answer,
                    Answer::Failed(Code::Unavailable) | Answer::Standby
                )
            })
            .count();
        (failed >= 5).then_some(failed)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", replicas.logs()));
    let probes = calls_while_down(&replicas).await;
    postgres.start_again().await.unwrap();
    let up = Instant::now();
    let back = first_claim_since(&traffic, up, None, &replicas).await;
    println!(
        "PostgreSQL crashed (-m immediate) under load: down {:.2?} ({refused} calls refused \
         UNAVAILABLE by then; {probes}), the first claim {back:.2?} after it was back",
        up - crashed
    );
    outages.push((crashed, up));
    claims_flow(&traffic, 10, &replicas).await;
    let recorded = traffic.stop().await;

    // The same process served throughout.
    assert!(replicas.is_running(0), "{}", replicas.logs());
    assert_eq!(replicas.server(0).pid(), pid);
    // Every call was answered in time; nothing failed as INTERNAL (or
    // UNKNOWN), during the outages or outside them.
    let mut in_outages = 0;
    for call in &recorded.calls {
        let during = outages
            .iter()
            .any(|(from, to)| call.ended >= *from && call.started <= *to);
        in_outages += usize::from(during && call.answer != Answer::Ok);
        assert!(
            !matches!(
                call.answer,
                Answer::TimedOut | Answer::Failed(Code::Internal | Code::Unknown)
            ),
            "{call:?} (during an outage: {during})\n{}",
            replicas.logs()
        );
    }

    let channel = replicas.server(0).channel().await.unwrap();
    converge(&channel, 1, Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", replicas.logs()));
    let subject = Subject {
        channel,
        database: postgres.url(),
        state_roots: vec![replicas.agent(0).options.state_root.clone()],
        nodes: replicas.node_names(),
        docker: &docker,
    };
    let Verdict {
        violations,
        claims_acked,
        releases_acked,
    } = check(&subject, &recorded).await;
    let log = replicas.server(0).log();
    println!(
        "postgres restart: {claims_acked} claims and {releases_acked} releases acknowledged, \
         {in_outages} calls failed during the outages, {} violations; the server reopened its \
         write connection {} times and stepped down {} times; {}",
        violations.len(),
        log.matches("write connection reopened").count(),
        log.matches("no longer leading").count(),
        recorded.tally()
    );
    assert!(
        violations.is_empty(),
        "violations:\n{}",
        violations.join("\n")
    );
}
