//! The server's one reading of the wall clock, so that every "now" in the
//! server comes from one place and `core` never reads a clock itself.

use boilerhouse_core::Timestamp;

/// The current wall-clock time.
pub fn now() -> Timestamp {
    Timestamp::from_system_time(std::time::SystemTime::now())
}
