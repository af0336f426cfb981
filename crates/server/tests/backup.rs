//! `bh admin backup` under claim traffic and `boilerhoused restore`, with a
//! real server, agent and Docker: every claim acknowledged before the
//! backup began is there after the restore. On PostgreSQL the server
//! answers with the pg_dump recipe instead, and the recipe's own tool
//! (pg_dump under traffic, restored into the emptied schema) is what is
//! tested.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boilerhouse_proto::pb;
use boilerhouse_testkit::cluster::Cluster;
use boilerhouse_testkit::database::{TestBackend, backend};
use boilerhouse_testkit::{stderr, stdout};

/// A claim the server acknowledged, and when the answer arrived.
struct Acked {
    at: Instant,
    claim: pb::ClaimInfo,
}

/// Claims for `tenants`, `workers` at a time, each holding what it got,
/// until every tenant has a claim or `stop` is set.
async fn claim_traffic(
    c: &Cluster,
    tenants: Vec<String>,
    workers: usize,
    acked: Arc<Mutex<Vec<Acked>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let queue = Arc::new(Mutex::new(tenants));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (queue, acked, stop) = (queue.clone(), acked.clone(), stop.clone());
        let mut claims = c.claims().await;
        tasks.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let Some(tenant) = queue.lock().unwrap().pop() else {
                    return;
                };
                let request = pb::ClaimRequest {
                    tenant_id: tenant,
                    workload_id: "demo".into(),
                    acquire_timeout: Some(boilerhouse_proto::convert::duration_to_pb(
                        Duration::from_secs(60),
                    )),
                    ..Default::default()
                };
                if let Ok(answer) = claims.claim(request).await {
                    let claim = answer.into_inner().claim.expect("a claim");
                    acked.lock().unwrap().push(Acked {
                        at: Instant::now(),
                        claim,
                    });
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

// Several threads, so that the claim traffic runs while bh waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_taken_under_claim_traffic_restores_every_claim_acknowledged_before_it() {
    let Some(mut c) = Cluster::builder()
        .node("backup")
        .workload("demo", |image| {
            format!(
                "id: demo\nimage: {image}\ncommand: [sleep, infinity]\n\
                 pool: {{min_size: 4, max_size: 40}}\n"
            )
        })
        .config("reconcile_interval = \"500ms\"")
        .start()
        .await
    else {
        return;
    };
    c.wait_idle("demo", 4).await;

    // Only an admin may copy the whole database.
    // (The server reads its token file again within a second.)
    let operator = c.server().create_token("ops", "operator").unwrap();
    let refused_file = c.dir().join("never-written.db");
    let refused_arg = refused_file.display().to_string();
    let refusal = c
        .eventually("the operator token to be known", || async {
            let out = c
                .server()
                .bh_as(Some(&operator), &["admin", "backup", &refused_arg]);
            assert!(!out.status.success());
            let err = stderr(&out);
            (!err.contains("not valid")).then_some(err)
        })
        .await;
    assert!(refusal.contains("needs scope admin"), "{refusal}");
    assert!(!refused_file.exists());

    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tenants: Vec<String> = (0..24).map(|i| format!("tenant-{i:02}")).collect();
    let traffic = {
        let (acked, stop) = (acked.clone(), stop.clone());
        let c = &c;
        async move { claim_traffic(c, tenants, 3, acked, stop).await }
    };
    let backup_file = c.dir().join("saved").join("boilerhouse-backup.db");
    std::fs::create_dir_all(backup_file.parent().unwrap()).unwrap();
    let postgres = backend() == TestBackend::Postgres;
    let take_backup = async {
        c.eventually("claims to be flowing", || async {
            (acked.lock().unwrap().len() >= 6).then_some(())
        })
        .await;
        let mut bh = c.server().bh_command(c.server().admin_token());
        bh.args(["admin", "backup"]).arg(&backup_file);
        let began = Instant::now();
        let out = tokio::task::spawn_blocking(move || bh.output())
            .await
            .unwrap()
            .unwrap();
        if postgres {
            // Refused with the recipe, and nothing written; the recipe's
            // dump is then taken while the claims go on.
            assert!(!out.status.success(), "{}", stdout(&out));
            let err = stderr(&out);
            assert!(
                err.contains("pg_dump") && err.contains("pg_restore"),
                "{err}"
            );
            assert!(!backup_file.exists());
            let began = Instant::now();
            c.save_database("pg-backup.sql");
            return (began, String::new());
        }
        assert!(
            out.status.success(),
            "{}\n{}",
            stderr(&out),
            c.server().log()
        );
        (began, stdout(&out))
    };
    let ((began, printed), ()) = tokio::join!(take_backup, traffic);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let before: Vec<pb::ClaimInfo> = acked
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a.at < began)
        .map(|a| a.claim.clone())
        .collect();
    let total = acked.lock().unwrap().len();
    eprintln!(
        "{} claims acknowledged before the backup began, {total} in all",
        before.len()
    );
    assert!(before.len() >= 6);
    if postgres {
        c.stop_server().await;
        c.lose_database().await;
        c.restore_database("pg-backup.sql").await;
        c.start_server().await;
    } else {
        assert!(printed.contains("integrity ok"), "{printed}");
        assert!(printed.contains("verified"), "{printed}");
        assert!(
            printed.contains(&format!(
                "{} bytes",
                std::fs::metadata(&backup_file).unwrap().len()
            )),
            "{printed}"
        );
        let events = c.bh_ok(&["events", "--kind", "database.backed_up", "-o", "json"]);
        assert!(events.contains("token:test-admin"), "who took it: {events}");

        // A running server's database is never replaced under it.
        let from = backup_file.display().to_string();
        let out = c.boilerhoused(&["restore", "--from", &from]);
        assert!(!out.status.success(), "{}", stdout(&out));
        assert!(stderr(&out).contains("stop it first"), "{}", stderr(&out));

        c.stop_server().await;
        let out = c.boilerhoused(&["restore", "--from", &from]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).contains("integrity ok"), "{}", stdout(&out));
        assert!(stderr(&out).contains("moved aside"), "{}", stderr(&out));
        c.start_server().await;
    }

    let mut claims = c.claims().await;
    for old in &before {
        let request = pb::GetClaimRequest {
            tenant_id: old.tenant_id.clone(),
            workload_id: "demo".into(),
        };
        let back = claims
            .get_claim(request)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", old.tenant_id, c.server().log()))
            .into_inner()
            .claim
            .unwrap();
        assert_eq!(back.container_id, old.container_id, "{}", old.tenant_id);
        assert_eq!(back.generation, old.generation, "{}", old.tenant_id);
    }
}
