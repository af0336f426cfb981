//! CPU time and memory of a process, from /proc: how the server (and the
//! fleet itself) fared over the measured window.

use std::time::Instant;

use serde::Serialize;

/// /proc counts CPU time in USER_HZ ticks, which Linux fixes at 100 for
/// user space whatever the kernel's own tick rate.
const TICKS_PER_SECOND: f64 = 100.0;

/// One reading.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    at: Instant,
    /// User plus system CPU ticks so far.
    ticks: u64,
    rss_bytes: u64,
}

/// Reads `pid` (`None`: this process); `None` when it is gone.
pub fn sample(pid: Option<u32>) -> Option<Sample> {
    let dir = pid.map_or_else(|| "/proc/self".to_owned(), |p| format!("/proc/{p}"));
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    // The command name may hold spaces; the fields after it do not.
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())?;
    Some(Sample {
        at: Instant::now(),
        ticks,
        rss_bytes: rss_kib * 1024,
    })
}

/// A process over a window: mean CPU, and its resident memory.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    /// Cores used on average (1.0: one core the whole window).
    pub cpu_cores: f64,
    pub window_s: f64,
    pub rss_mib_end: f64,
    pub rss_mib_max: f64,
}

/// Follows one process over a window, sampled as often as the caller asks.
pub struct Window {
    pid: Option<u32>,
    first: Option<Sample>,
    last: Option<Sample>,
    rss_max: u64,
}

impl Window {
    pub fn begin(pid: Option<u32>) -> Self {
        let first = sample(pid);
        Self {
            pid,
            first,
            last: first,
            rss_max: first.map_or(0, |s| s.rss_bytes),
        }
    }

    /// Takes a reading; a process that has gone keeps its last one.
    pub fn tick(&mut self) {
        if let Some(s) = sample(self.pid) {
            self.rss_max = self.rss_max.max(s.rss_bytes);
            self.last = Some(s);
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        let (first, last) = (self.first?, self.last?);
        let window = last.at.duration_since(first.at).as_secs_f64();
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        Some(Usage {
            cpu_cores: if window > 0.0 {
                (last.ticks - first.ticks) as f64 / TICKS_PER_SECOND / window
            } else {
                0.0
            },
            window_s: window,
            rss_mib_end: mib(last.rss_bytes),
            rss_mib_max: mib(self.rss_max),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let mut w = Window::begin(None);
        // Burn some CPU so the window's figure cannot be zero by accident.
        let began = Instant::now();
        let mut x = 0u64;
        while began.elapsed().as_millis() < 300 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        w.tick();
        let u = w.usage().expect("readable");
        assert!(u.rss_mib_end > 1.0, "{u:?}");
        assert!(u.cpu_cores > 0.1, "{u:?}");
        assert!(sample(Some(u32::MAX)).is_none());
    }
}
