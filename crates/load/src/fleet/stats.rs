//! What the fleet saw: sessions, commands, messages sent, and each outage
//! (agents losing the server) until every agent was back.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::engine::Engine;

/// Shared by every agent of the fleet.
pub struct Stats {
    agents: usize,
    began: Instant,
    engines: Mutex<Vec<Option<Arc<Mutex<Engine>>>>>,
    inner: Mutex<Inner>,
}

struct Inner {
    connected: usize,
    sessions: u64,
    /// Connect to Welcome, microseconds.
    welcome: Histogram<u64>,
    failed_attempts: BTreeMap<String, u64>,
    ended: BTreeMap<String, u64>,
    commands: BTreeMap<&'static str, u64>,
    command_failures: BTreeMap<String, u64>,
    heartbeats: u64,
    reports: u64,
    report_containers: u64,
    events: u64,
    all_connected_after: Option<Duration>,
    outage: Option<Outage>,
    outages: Vec<OutageRecord>,
}

struct Outage {
    began: Instant,
    most_lost: usize,
    failed_attempts: u64,
}

/// One outage: from the first agent losing its session until every agent
/// had one again.
#[derive(Debug, Clone, Serialize)]
pub struct OutageRecord {
    /// Seconds into the run it began.
    pub at_s: f64,
    /// The most agents without a session at once.
    pub most_lost: usize,
    /// Seconds until every agent had a session again.
    pub all_back_after_s: f64,
    /// Connection attempts refused or failed meanwhile (the storm).
    pub failed_attempts: u64,
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

fn summary(h: &Histogram<u64>) -> Summary {
    let ms = |v: u64| v as f64 / 1000.0;
    Summary {
        count: h.len(),
        p50: ms(h.value_at_quantile(0.5)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
    }
}

/// A snapshot of the counts, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct Counts {
    pub connected: usize,
    pub containers: usize,
    pub sessions: u64,
    pub connect_to_welcome_ms: Summary,
    pub failed_attempts: BTreeMap<String, u64>,
    pub sessions_ended: BTreeMap<String, u64>,
    pub commands: BTreeMap<&'static str, u64>,
    pub command_failures: BTreeMap<String, u64>,
    pub heartbeats: u64,
    pub full_reports: u64,
    pub reported_containers: u64,
    pub events: u64,
    pub all_connected_after_s: Option<f64>,
    pub outages: Vec<OutageRecord>,
}

impl Stats {
    pub fn new(agents: usize) -> Self {
        Self {
            agents,
            began: Instant::now(),
            engines: Mutex::new(vec![None; agents]),
            inner: Mutex::new(Inner {
                connected: 0,
                sessions: 0,
                welcome: Histogram::new_with_bounds(1, 600_000_000, 3)
                    .expect("valid histogram bounds"),
                failed_attempts: BTreeMap::new(),
                ended: BTreeMap::new(),
                commands: BTreeMap::new(),
                command_failures: BTreeMap::new(),
                heartbeats: 0,
                reports: 0,
                report_containers: 0,
                events: 0,
                all_connected_after: None,
                outage: None,
                outages: Vec::new(),
            }),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_engine(&self, index: usize, engine: Arc<Mutex<Engine>>) {
        let mut engines = self.engines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = engines.get_mut(index) {
            *slot = Some(engine);
        }
    }

    /// Containers across the fleet.
    pub fn containers(&self) -> usize {
        let engines: Vec<_> = self
            .engines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
            .cloned()
            .collect();
        engines
            .iter()
            .map(|e| e.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn connected_now(&self) -> usize {
        self.inner().connected
    }

    pub fn connected(&self, took: Duration) {
        let mut i = self.inner();
        i.connected += 1;
        i.sessions += 1;
        i.welcome
            .saturating_record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
        if i.connected == self.agents {
            if i.all_connected_after.is_none() {
                i.all_connected_after = Some(self.began.elapsed());
            }
            if let Some(o) = i.outage.take() {
                let record = OutageRecord {
                    at_s: o.began.duration_since(self.began).as_secs_f64(),
                    most_lost: o.most_lost,
                    all_back_after_s: o.began.elapsed().as_secs_f64(),
                    failed_attempts: o.failed_attempts,
                };
                i.outages.push(record);
            }
        }
    }

    pub fn disconnected(&self) {
        let mut i = self.inner();
        i.connected -= 1;
        let lost = self.agents - i.connected;
        // Outages count once the fleet was whole: the first connections
        // are the start, not an outage.
        if i.all_connected_after.is_some() {
            let o = i.outage.get_or_insert_with(|| Outage {
                began: Instant::now(),
                most_lost: 0,
                failed_attempts: 0,
            });
            o.most_lost = o.most_lost.max(lost);
        }
    }

    pub fn session_failed(&self, welcomed: bool, reason: &str) {
        let mut i = self.inner();
        let reason: String = reason.chars().take(120).collect();
        if welcomed {
            *i.ended.entry(reason).or_default() += 1;
        } else {
            *i.failed_attempts.entry(reason).or_default() += 1;
            if let Some(o) = i.outage.as_mut() {
                o.failed_attempts += 1;
            }
        }
    }

    pub fn command(&self, kind: &'static str) {
        *self.inner().commands.entry(kind).or_default() += 1;
    }

    pub fn command_failed(&self, error: &str) {
        let error: String = error.chars().take(120).collect();
        *self.inner().command_failures.entry(error).or_default() += 1;
    }

    pub fn heartbeat(&self) {
        self.inner().heartbeats += 1;
    }

    pub fn report(&self, containers: usize) {
        let mut i = self.inner();
        i.reports += 1;
        i.report_containers += containers as u64;
    }

    pub fn events(&self, n: u64) {
        self.inner().events += n;
    }

    pub fn counts(&self) -> Counts {
        let containers = self.containers();
        let i = self.inner();
        Counts {
            connected: i.connected,
            containers,
            sessions: i.sessions,
            connect_to_welcome_ms: summary(&i.welcome),
            failed_attempts: i.failed_attempts.clone(),
            sessions_ended: i.ended.clone(),
            commands: i.commands.clone(),
            command_failures: i.command_failures.clone(),
            heartbeats: i.heartbeats,
            full_reports: i.reports,
            reported_containers: i.report_containers,
            events: i.events,
            all_connected_after_s: i.all_connected_after.map(|d| d.as_secs_f64()),
            outages: i.outages.clone(),
        }
    }
}
