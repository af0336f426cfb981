//! boilerhoused as a real process over its life: a restart shows the same
//! state, watches resume without gaps and end at shutdown, and bh speaks
//! plainly about a server that is down, its status and its event stream.

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio_stream::StreamExt as _;
use tonic::Code;

use boilerhouse_proto::pb;
use boilerhouse_proto::pb::event_service_client::EventServiceClient;
use boilerhouse_proto::pb::workload_service_client::WorkloadServiceClient;
use boilerhouse_testkit::{ServerProcess, stderr, stdout};

mod api_support;
use api_support::{copy_examples, list};

#[tokio::test]
async fn a_restart_shows_the_same_state_and_ctrl_c_exits_cleanly() {
    let temp = tempfile::tempdir().unwrap();
    let options = copy_examples(temp.path());
    let mut server = ServerProcess::start_in(temp.path(), options.clone())
        .await
        .unwrap();
    let mut workloads = WorkloadServiceClient::new(server.channel().await.unwrap());
    workloads
        .apply_workload(pb::ApplyWorkloadRequest {
            yaml: "id: applied\nimage: busybox\n".into(),
            dry_run: false,
            request_id: "r-1".into(),
        })
        .await
        .unwrap();
    let before = list(&server).await;
    let events_before = EventServiceClient::new(server.channel().await.unwrap())
        .list_events(pb::ListEventsRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;

    // Ctrl-C: exits by itself, successfully, within seconds.
    let status = server
        .signal_and_wait(Signal::SIGINT, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}\n{}", server.log());

    let server = ServerProcess::start_in(temp.path(), options).await.unwrap();
    let after = list(&server).await;
    let strip = |r: &pb::ListWorkloadsResponse| -> Vec<(String, String, String)> {
        r.workloads
            .iter()
            .map(|w| (w.id.clone(), w.spec_hash.clone(), w.yaml.clone()))
            .collect()
    };
    assert_eq!(strip(&after), strip(&before));
    let created: Vec<_> = after.workloads.iter().map(|w| w.created_at).collect();
    assert_eq!(
        created,
        before
            .workloads
            .iter()
            .map(|w| w.created_at)
            .collect::<Vec<_>>(),
        "not re-created"
    );

    let mut events = EventServiceClient::new(server.channel().await.unwrap());
    let events_after = events
        .list_events(pb::ListEventsRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(
        &events_after[..events_before.len()],
        &events_before[..],
        "the activity log survived"
    );
    let kinds: Vec<&str> = events_after[events_before.len()..]
        .iter()
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(
        kinds,
        ["server.stopping", "server.started"],
        "no workload was reloaded as new"
    );

    // The idempotency key survived the restart as well.
    let again = WorkloadServiceClient::new(server.channel().await.unwrap())
        .apply_workload(pb::ApplyWorkloadRequest {
            yaml: "id: applied\nimage: busybox\n".into(),
            dry_run: false,
            request_id: "r-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.outcome, pb::ApplyOutcome::Created as i32);
}

#[tokio::test]
async fn watch_resumes_without_gaps_and_ends_at_shutdown() {
    let mut server = ServerProcess::start().await.unwrap();
    let channel = server.channel().await.unwrap();
    let mut events = EventServiceClient::new(channel.clone());
    let mut workloads = WorkloadServiceClient::new(channel);
    let filter = pb::EventFilter {
        kinds: vec!["workload.".into()],
        ..Default::default()
    };

    let mut stream = events
        .watch_events(pb::WatchEventsRequest {
            filter: Some(filter.clone()),
            resume_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    for n in 0..3 {
        workloads
            .apply_workload(pb::ApplyWorkloadRequest {
                yaml: format!("id: w{n}\nimage: busybox\n"),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut tokens = Vec::new();
    for n in 0..3 {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let event = msg.event.unwrap();
        assert_eq!(event.kind, "workload.applied");
        assert_eq!(event.workload_id, format!("w{n}"));
        tokens.push(msg.resume_token);
    }
    drop(stream);

    // Resume from the first token: the two later events are replayed, then
    // new ones follow, in order, with nothing twice.
    let mut resumed = events
        .watch_events(pb::WatchEventsRequest {
            filter: Some(filter),
            resume_token: tokens[0].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    workloads
        .apply_workload(pb::ApplyWorkloadRequest {
            yaml: "id: w3\nimage: busybox\n".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let msg = tokio::time::timeout(Duration::from_secs(10), resumed.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push(msg.event.unwrap().workload_id);
    }
    assert_eq!(seen, ["w1", "w2", "w3"]);

    let err = events
        .watch_events(pb::WatchEventsRequest {
            filter: None,
            resume_token: "not-a-token".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // SIGTERM: the open stream ends and the server exits on its own.
    let status = server
        .signal_and_wait(Signal::SIGTERM, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let end = tokio::time::timeout(Duration::from_secs(10), resumed.next())
        .await
        .unwrap();
    assert!(
        !matches!(end, Some(Ok(_))),
        "no event after shutdown: {end:?}"
    );
}

#[tokio::test]
async fn bh_speaks_in_one_sentence_when_the_server_is_down() {
    let out = std::process::Command::new(boilerhouse_testkit::binary("bh"))
        .args(["--server", "127.0.0.1:1", "workload", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(
        err.trim().lines().count(),
        1,
        "one sentence, no trace: {err}"
    );
    assert!(
        err.contains("cannot reach boilerhoused at http://127.0.0.1:1"),
        "{err}"
    );
}

#[tokio::test]
async fn bh_status_and_output_formats() {
    let temp = tempfile::tempdir().unwrap();
    let options = copy_examples(temp.path());
    let server = ServerProcess::start_in(temp.path(), options).await.unwrap();

    let out = server.bh(&["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("3 loaded")
            && text.contains("workload_loader")
            && text.contains("activity_log_trim"),
        "{text}"
    );

    let out = server.bh(&["workload", "get", "sandbox", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["id"], "sandbox");
    assert_eq!(json["max_size"], 10);

    let out = server.bh(&["workload", "list", "-o", "yaml"]);
    assert!(stdout(&out).contains("- id: agent"), "{}", stdout(&out));

    let out = server.bh(&["workload", "get", "nope"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));

    let out = server.bh(&["node", "list", "-o", "json"]);
    assert_eq!(stdout(&out).trim(), "[]");

    let out = server.bh(&["completions", "bash"]);
    assert!(stdout(&out).contains("_bh()"), "a bash completion function");
}

#[tokio::test]
async fn bh_events_follow_streams_new_events_as_ndjson() {
    use std::io::BufRead as _;

    let server = ServerProcess::start().await.unwrap();
    let mut follow = server
        .bh_command(server.admin_token())
        .args(["events", "--follow", "--kind", "workload.", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (lines_tx, mut lines_rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    // Keep applying until bh has subscribed and shows an event.
    let mut workloads = WorkloadServiceClient::new(server.channel().await.unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut attempt = 0;
    let seen = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "bh never printed the applied workload"
        );
        // A new spec each time: an unchanged apply records no event.
        attempt += 1;
        workloads
            .apply_workload(pb::ApplyWorkloadRequest {
                yaml: format!("id: followed\nimage: busybox:{attempt}\n"),
                ..Default::default()
            })
            .await
            .unwrap();
        if let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_millis(500), lines_rx.recv()).await
        {
            break line;
        }
    };
    let event: serde_json::Value = serde_json::from_str(&seen).unwrap();
    assert_eq!(event["workload_id"], "followed");
    assert!(
        event["kind"].as_str().unwrap().starts_with("workload."),
        "{event}"
    );
    follow.kill().unwrap();
    follow.wait().unwrap();
}
