//! Heartbeats, sent from a task of their own.
//!
//! The session's loop talks to the engine: one inspect per event, a list
//! and an inspect per container for a full report. On a node filling a
//! thousand containers that loop is busy for seconds at a time, and when
//! heartbeats were one of its branches they waited behind it: the server
//! saw the node go Suspect and come back over and over while it was
//! healthy and working. Here they keep their rhythm whatever the loop does,
//! with two exceptions that keep them honest:
//! - they carry the usage of the loop's latest snapshot, published through
//!   a watch channel after every change;
//! - they stop while the loop has been stuck in one step for longer than
//!   [`STUCK`] (an engine that stopped answering), so the server learns
//!   that this node does not work instead of hearing that it is fine.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
// Tokio's clock, so the stuck check follows a paused clock in tests.
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use boilerhouse_core::Timestamp;
use boilerhouse_proto::convert::timestamp_to_pb;
use boilerhouse_proto::pb;

use crate::session::Snapshot;

/// How long one step of the session's loop may take before heartbeats
/// stop. A full report of 10,000 containers takes a few seconds; an
/// engine that answers nothing for this long is not working.
pub const STUCK: Duration = Duration::from_secs(30);

/// What the node's running containers reserve, and how many there are.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    /// The sum of their limits.
    pub reserved: pb::Resources,
    /// How many are running.
    pub running: u32,
}

impl Usage {
    /// The usage of a snapshot.
    pub fn of(containers: &Snapshot) -> Self {
        let mut usage = Usage::default();
        for c in containers.values().filter(|c| c.is_running()) {
            usage.reserved.cpus += c.limits.cpus.unwrap_or(0.0);
            usage.reserved.memory_bytes += c.limits.memory_bytes.unwrap_or(0);
            usage.running += 1;
        }
        usage
    }
}

/// The heartbeat task of one session; dropping this stops it.
pub struct Heartbeats {
    usage: watch::Sender<Usage>,
    busy_since: Arc<Mutex<Option<Instant>>>,
    _task: AbortOnDropHandle<()>,
}

impl Heartbeats {
    /// Starts sending a heartbeat every `every` on `out`, the first at once.
    pub fn start(out: mpsc::Sender<pb::ConnectRequest>, every: Duration, usage: Usage) -> Self {
        let (usage, usage_rx) = watch::channel(usage);
        let busy_since = Arc::new(Mutex::new(None));
        let task = tokio::spawn(beat(out, every, usage_rx, busy_since.clone()));
        Self {
            usage,
            busy_since,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// Publishes the usage of the loop's new snapshot.
    pub fn update(&self, containers: &Snapshot) {
        self.usage.send_if_modified(|usage| {
            let new = Usage::of(containers);
            let changed = *usage != new;
            *usage = new;
            changed
        });
    }

    /// Marks the loop busy until the guard drops.
    pub fn busy(&self) -> Busy<'_> {
        *self.busy_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        Busy(&self.busy_since)
    }
}

/// The loop is in one step; see [`Heartbeats::busy`].
pub struct Busy<'a>(&'a Mutex<Option<Instant>>);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

async fn beat(
    out: mpsc::Sender<pb::ConnectRequest>,
    every: Duration,
    usage: watch::Receiver<Usage>,
    busy_since: Arc<Mutex<Option<Instant>>>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut withheld = false;
    loop {
        tick.tick().await;
        let stuck_for = busy_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|since| since.elapsed())
            .filter(|busy| *busy > STUCK);
        if let Some(busy) = stuck_for {
            if !withheld {
                tracing::warn!(busy = ?busy, "the session has been stuck in one step (an unanswering engine?); withholding heartbeats until it moves");
                withheld = true;
            }
            continue;
        }
        if withheld {
            tracing::info!("the session moves again; heartbeats resume");
            withheld = false;
        }
        let Usage { reserved, running } = usage.borrow().clone();
        let message = pb::ConnectRequest {
            message: Some(pb::connect_request::Message::Heartbeat(pb::Heartbeat {
                at: Some(timestamp_to_pb(Timestamp::from_system_time(
                    std::time::SystemTime::now(),
                ))),
                usage: Some(reserved),
                container_count: running,
            })),
        };
        // The session is gone: so is its stream.
        if out.send(message).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat(message: pb::ConnectRequest) -> pb::Heartbeat {
        match message.message {
            Some(pb::connect_request::Message::Heartbeat(h)) => h,
            other => panic!("expected a heartbeat, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_keep_their_rhythm_carry_the_latest_usage_and_stop_while_the_loop_is_stuck()
    {
        let (out, mut rx) = mpsc::channel(16);
        let every = Duration::from_secs(5);
        let heartbeats = Heartbeats::start(out, every, Usage::default());
        assert_eq!(heartbeat(rx.recv().await.unwrap()).container_count, 0);

        let mut snapshot = Snapshot::new();
        let c = boilerhouse_core::container::ObservedContainer {
            docker_id: "a".into(),
            name: "a".into(),
            labels: Default::default(),
            docker_state: "running".into(),
            health: None,
            health_output: None,
            exit_code: 0,
            started_at: None,
            oom_killed: false,
            limits: boilerhouse_core::workload::Limits {
                memory_bytes: Some(1 << 20),
                ..Default::default()
            },
            state_file: None,
        };
        snapshot.insert(c.docker_id.clone(), c);
        heartbeats.update(&snapshot);
        let h = heartbeat(rx.recv().await.unwrap());
        assert_eq!(h.container_count, 1);
        assert_eq!(h.usage.unwrap().memory_bytes, 1 << 20);

        // Busy, but not for long: heartbeats go on.
        let busy = heartbeats.busy();
        assert_eq!(heartbeat(rx.recv().await.unwrap()).container_count, 1);
        // Stuck past STUCK: none until the step ends.
        tokio::time::advance(STUCK).await;
        let _ = rx.try_recv();
        let quiet = tokio::time::timeout(every * 3, rx.recv()).await;
        assert!(
            quiet.is_err(),
            "a heartbeat went out while stuck: {quiet:?}"
        );
        drop(busy);
        assert_eq!(heartbeat(rx.recv().await.unwrap()).container_count, 1);

        // Dropping the handle stops the task, which drops its sender.
        drop(heartbeats);
        while rx.recv().await.is_some() {}
    }
}
