//! The server's one reading of the wall clock, so that every "now" in the
//! server comes from one place and `core` never reads a clock itself.

use boilerhouse_core::Timestamp;

/// The current wall-clock time.
pub fn now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}

/// Where a component reads "now": the wall clock in production, or one
/// that follows tokio's clock so time-driven logic can be tested with
/// `tokio::time::pause`.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The wall clock.
    Wall,
    /// `base` plus the tokio time elapsed since `start`.
    Tokio {
        /// The reading at `start`.
        base: Timestamp,
        /// When the clock was made.
        start: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that reads `base` now and advances with tokio's clock.
    pub fn following_tokio(base: Timestamp) -> Self {
        Clock::Tokio {
            base,
            start: tokio::time::Instant::now(),
        }
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        match self {
            Clock::Wall => now(),
            Clock::Tokio { base, start } => base.saturating_add(start.elapsed()),
        }
    }
}
