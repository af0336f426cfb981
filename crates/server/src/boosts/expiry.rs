//! Wakes the boost task at each expiry deadline.
//!
//! The boost task also runs every second, which alone would end a boost up
//! to a second late. Sleeping until the earliest deadline instead ends it
//! within milliseconds; the periodic run remains the safety net for a
//! missed wake-up or a wall clock that jumped.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::BoostLedger;
use crate::clock::Clock;

/// After waking the task for a deadline, how long to wait for it to end
/// the boost before looking again, so a boost that stays due (the database
/// is refusing writes) cannot spin this loop.
const SETTLE: Duration = Duration::from_millis(200);

/// Calls `wake` at every boost expiry until `cancel` fires.
pub async fn wake_at_deadlines(
    ledger: BoostLedger,
    clock: Clock,
    wake: impl Fn() + Send,
    cancel: CancellationToken,
) {
    loop {
        let wait = ledger
            .next_expiry()
            .map(|at| at.saturating_since(clock.now()));
        let deadline = async {
            match wait {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // Cancel-safe: observing the token loses nothing.
            () = cancel.cancelled() => return,
            // Cancel-safe: Notify keeps a permit until polled again.
            () = ledger.changed().notified() => continue,
            () = deadline => {}
        }
        wake();
        tokio::select! {
            () = cancel.cancelled() => return,
            () = ledger.changed().notified() => {}
            () = tokio::time::sleep(SETTLE) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use boilerhouse_core::boost::{Boost, BoostPriority, BoostResource, BoostStatus, BoostTarget};
    use boilerhouse_core::{BoostId, NodeId, Timestamp};

    use super::*;

    fn active(n: u128, now: Timestamp, lasts: Duration) -> Boost {
        Boost {
            id: BoostId::from_uuid(uuid::Uuid::from_u128(n)),
            target: BoostTarget::Node(NodeId::new("b").unwrap()),
            container_id: None,
            resource: BoostResource::Cpu,
            amount: 1.0,
            priority: BoostPriority::Normal,
            source_node: NodeId::new("a").unwrap(),
            status: BoostStatus::Active,
            reason: String::new(),
            requested_at: now,
            allocated_at: Some(now),
            expires_at: now.saturating_add(lasts),
            ended_at: None,
        }
    }

    /// Lets every task that can run do so, without moving the clock.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    struct Harness {
        ledger: BoostLedger,
        clock: Clock,
        wakes: Arc<AtomicUsize>,
        cancel: CancellationToken,
    }

    fn start() -> Harness {
        let ledger = BoostLedger::default();
        let clock = Clock::following_tokio(Timestamp::from_millis(1_700_000_000_000));
        let wakes = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let counter = wakes.clone();
        tokio::spawn(wake_at_deadlines(
            ledger.clone(),
            clock,
            move || {
                counter.fetch_add(1, Ordering::SeqCst);
            },
            cancel.clone(),
        ));
        Harness {
            ledger,
            clock,
            wakes,
            cancel,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn wakes_at_the_deadline_not_before() {
        let h = start();
        h.ledger
            .put(active(1, h.clock.now(), Duration::from_secs(30 * 60)));
        settle().await;
        tokio::time::advance(Duration::from_secs(30 * 60) - Duration::from_millis(5)).await;
        settle().await;
        assert_eq!(
            h.wakes.load(Ordering::SeqCst),
            0,
            "woke before the deadline"
        );
        tokio::time::advance(Duration::from_millis(10)).await;
        settle().await;
        assert_eq!(
            h.wakes.load(Ordering::SeqCst),
            1,
            "did not wake at the deadline"
        );
        h.cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_sooner_boost_rearms_and_an_ended_one_is_forgotten() {
        let h = start();
        let long = active(1, h.clock.now(), Duration::from_secs(3600));
        h.ledger.put(long.clone());
        settle().await;
        // A boost expiring sooner moves the wake-up earlier.
        h.ledger
            .put(active(2, h.clock.now(), Duration::from_secs(60)));
        settle().await;
        tokio::time::advance(Duration::from_secs(61)).await;
        settle().await;
        assert_eq!(h.wakes.load(Ordering::SeqCst), 1);
        // The task ends boost 2; released early, boost 1 never fires.
        let mut short = h
            .ledger
            .get(&BoostId::from_uuid(uuid::Uuid::from_u128(2)))
            .unwrap();
        short.end(BoostStatus::Expired, "time is up", h.clock.now());
        h.ledger.put(short);
        let mut long = long;
        long.end(BoostStatus::Released, "by an operator", h.clock.now());
        h.ledger.put(long);
        settle().await;
        tokio::time::advance(Duration::from_secs(2 * 3600)).await;
        settle().await;
        assert_eq!(h.wakes.load(Ordering::SeqCst), 1);
        h.cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_boost_left_due_is_retried_without_spinning() {
        let h = start();
        h.ledger
            .put(active(1, h.clock.now(), Duration::from_secs(10)));
        settle().await;
        tokio::time::advance(Duration::from_secs(10)).await;
        settle().await;
        assert_eq!(h.wakes.load(Ordering::SeqCst), 1);
        // Nobody ends it (say the database refuses writes): one more wake
        // per settle period, not a busy loop.
        tokio::time::advance(SETTLE).await;
        settle().await;
        let wakes = h.wakes.load(Ordering::SeqCst);
        assert!(
            (2..=3).contains(&wakes),
            "woke {wakes} times in one settle period"
        );
        h.cancel.cancel();
    }
}
