//! A small driver for background tasks, after omicron's.
//!
//! A task takes no input. It runs when its period elapses or when someone
//! activates it, and each run reads the current state itself; an
//! activation only wakes it. The rare path (after a restart, after a missed
//! notification) is therefore the same code as the common one. Each run's
//! summary is kept so `bh status` can show what every task last did.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A periodic background activity.
pub trait BackgroundTask: Send + 'static {
    /// Does one round of work and summarises it as JSON.
    fn activate(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>>;
}

/// What a task last did.
#[derive(Debug, Clone, Default)]
pub struct TaskStatus {
    /// Time between periodic runs.
    pub period: Duration,
    /// Runs so far.
    pub activations: u64,
    /// When the last run started.
    pub last_started_at: Option<SystemTime>,
    /// How long it took.
    pub last_duration: Option<Duration>,
    /// Its summary.
    pub last_status: serde_json::Value,
    /// Its error, if it failed.
    pub last_error: Option<String>,
}

/// Wakes a task now.
#[derive(Clone)]
pub struct Activator(Arc<Notify>);

impl Activator {
    /// Asks the task to run as soon as it can. Activations made while it is
    /// running coalesce into one more run.
    pub fn activate(&self) {
        self.0.notify_one();
    }
}

/// Owns every background task.
#[derive(Clone)]
pub struct Driver {
    statuses: Arc<RwLock<BTreeMap<&'static str, TaskStatus>>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Driver {
    /// Tasks stop when `cancel` fires; `tracker` lets shutdown wait for them.
    pub fn new(cancel: CancellationToken, tracker: TaskTracker) -> Self {
        Self {
            statuses: Arc::default(),
            cancel,
            tracker,
        }
    }

    /// Starts `task`: it runs at once, then every `period` and on each
    /// activation. With a `debounce`, an activation waits that long first
    /// so a burst of pokes (an editor saving a file in steps) costs one run.
    pub fn register(
        &self,
        name: &'static str,
        period: Duration,
        debounce: Option<Duration>,
        mut task: impl BackgroundTask,
    ) -> Activator {
        let notify = Arc::new(Notify::new());
        let activator = Activator(notify.clone());
        if let Ok(mut statuses) = self.statuses.write() {
            statuses.insert(
                name,
                TaskStatus {
                    period,
                    ..Default::default()
                },
            );
        }
        let statuses = self.statuses.clone();
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    // Cancel-safe: cancelled() only observes the token.
                    () = cancel.cancelled() => break,
                    // Cancel-safe: a lost tick is simply taken next time.
                    _ = ticker.tick() => {}
                    // Cancel-safe: Notify keeps the permit until notified()
                    // is polled again, so no activation is lost.
                    () = notify.notified() => {
                        if let Some(debounce) = debounce {
                            tokio::select! {
                                () = cancel.cancelled() => break,
                                () = tokio::time::sleep(debounce) => {}
                            }
                        }
                    }
                }
                let started = Instant::now();
                let started_at = SystemTime::now();
                // A run is never cut in half by shutdown: the tracker waits.
                let result = task.activate().await;
                let elapsed = started.elapsed();
                if let Err(e) = &result {
                    tracing::warn!(task = name, error = %format!("{e:#}"), "background task failed");
                }
                if let Ok(mut statuses) = statuses.write() {
                    let status = statuses.entry(name).or_default();
                    status.activations += 1;
                    status.last_started_at = Some(started_at);
                    status.last_duration = Some(elapsed);
                    match result {
                        Ok(summary) => {
                            status.last_status = summary;
                            status.last_error = None;
                        }
                        Err(e) => status.last_error = Some(format!("{e:#}")),
                    }
                }
            }
            tracing::debug!(task = name, "background task stopped");
        });
        activator
    }

    /// Every task's status, by name.
    pub fn statuses(&self) -> BTreeMap<&'static str, TaskStatus> {
        self.statuses.read().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Runs `activate` every time `wait` resolves, until `cancel`: how a
/// task is woken early by something other than its period (claims wake
/// the refiller; a node's first report wakes reconciliation).
pub async fn wake_on<W, F>(
    mut wait: W,
    activate: impl Fn(),
    cancel: tokio_util::sync::CancellationToken,
) where
    W: FnMut() -> F,
    F: std::future::Future<Output = ()>,
{
    loop {
        tokio::select! {
            // Cancel-safe: observing the token loses nothing.
            () = cancel.cancelled() => break,
            // Cancel-safe: a missed wake-up is covered by the task's period.
            () = wait() => activate(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Counter(Arc<AtomicU64>);

    impl BackgroundTask for Counter {
        fn activate(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
            Box::pin(async move {
                let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
                if n == 2 {
                    anyhow::bail!("second run fails");
                }
                Ok(serde_json::json!({ "runs": n }))
            })
        }
    }

    /// Polls with a deadline. Time is paused, so each sleep lets the
    /// runtime auto-advance to the next timer instead of really waiting.
    async fn wait_for(count: &AtomicU64, at_least: u64) {
        for _ in 0..1_000 {
            if count.load(Ordering::SeqCst) >= at_least {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("task did not reach {at_least} runs");
    }

    #[tokio::test(start_paused = true)]
    async fn tasks_run_at_start_on_their_period_and_when_activated() {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let driver = Driver::new(cancel.clone(), tracker.clone());
        let runs = Arc::new(AtomicU64::new(0));
        let activator = driver.register(
            "count",
            Duration::from_secs(60),
            None,
            Counter(runs.clone()),
        );

        wait_for(&runs, 1).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1, "runs once at start");

        activator.activate();
        wait_for(&runs, 2).await;
        let status = &driver.statuses()["count"];
        assert_eq!(status.activations, 2);
        assert!(
            status
                .last_error
                .as_deref()
                .unwrap()
                .contains("second run fails")
        );

        tokio::time::advance(Duration::from_secs(61)).await;
        wait_for(&runs, 3).await;
        let status = &driver.statuses()["count"];
        assert!(status.last_error.is_none(), "a good run clears the error");
        assert_eq!(status.last_status["runs"], 3);

        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test(start_paused = true)]
    async fn activations_during_a_debounce_coalesce() {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let driver = Driver::new(cancel.clone(), tracker.clone());
        let runs = Arc::new(AtomicU64::new(0));
        let activator = driver.register(
            "debounced",
            Duration::from_secs(3600),
            Some(Duration::from_millis(200)),
            Counter(runs.clone()),
        );
        wait_for(&runs, 1).await;
        let poked_at = tokio::time::Instant::now();
        for _ in 0..5 {
            activator.activate();
        }
        wait_for(&runs, 2).await;
        assert!(
            poked_at.elapsed() >= Duration::from_millis(200),
            "the run waited out the debounce"
        );
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 2, "five pokes, one run");
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
