//! Output formats: aligned tables for people, JSON and YAML for programs.

/// `println!`, except that a reader gone away (`bh events | head`) ends bh
/// quietly, as it ends Unix tools, where `println!` panics on the next
/// line (Rust ignores SIGPIPE). See [`output::write_stdout`].
macro_rules! out {
    () => {
        $crate::output::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!`, as [`out!`] is `println!`.
macro_rules! out_text {
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!($($arg)*))
    };
}

use std::time::{Duration, SystemTime};

use comfy_table::{ContentArrangement, Table, presets};
use serde::Serialize;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns, like kubectl and nomad.
    Table,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// Writes to stdout. A reader that has gone away (a closed pipe: `bh
/// events --follow | head -3`) ends bh at once with the status a shell
/// reports for a process SIGPIPE killed (141), as `git log | head` ends
/// git; whatever was asked of the server was done. Any other failure to
/// write ends it with a message and status 1.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("bh: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// A kubectl-style table: header row, no borders.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    t
}

/// Prints a table without the leading space comfy-table's preset leaves.
pub fn print_table(t: &Table) {
    for line in t.to_string().lines() {
        out!("{}", line.strip_prefix(' ').unwrap_or(line).trim_end());
    }
}

/// Prints `value` as JSON or YAML.
pub fn print_structured<T: Serialize>(format: Format, value: &T) -> Result<(), String> {
    match format {
        Format::Json => {
            let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
            out!("{text}");
        }
        Format::Yaml => {
            let text = serde_saphyr::to_string(value).map_err(|e| e.to_string())?;
            out_text!("{text}");
            if !text.ends_with('\n') {
                out!();
            }
        }
        Format::Table => {}
    }
    Ok(())
}

/// A protobuf timestamp as RFC 3339, or empty.
pub fn time(t: Option<&prost_types::Timestamp>) -> String {
    match t {
        Some(t) if t.seconds != 0 || t.nanos != 0 => {
            let when = SystemTime::UNIX_EPOCH
                + Duration::from_secs(t.seconds.max(0) as u64)
                + Duration::from_nanos(t.nanos.max(0) as u64);
            humantime::format_rfc3339_seconds(when).to_string()
        }
        _ => String::new(),
    }
}

/// How long ago `t` was, the way kubectl's AGE column shows it.
pub fn age(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t else { return String::new() };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let secs = (now - t.seconds).max(0) as u64;
    short_duration(Duration::from_secs(secs))
}

/// `5s`, `3m`, `2h`, `4d`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// A protobuf duration, humanly.
pub fn duration(d: Option<&prost_types::Duration>) -> String {
    match d {
        Some(d) => {
            let d = Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32);
            if d < Duration::from_secs(1) {
                // Sub-second durations to a tenth of a millisecond.
                format!("{:.1}ms", d.as_secs_f64() * 1000.0)
            } else {
                let whole = Duration::from_millis(d.as_millis() as u64);
                humantime::format_duration(whole)
                    .to_string()
                    .replace(' ', "")
            }
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl_ages() {
        assert_eq!(short_duration(Duration::from_secs(5)), "5s");
        assert_eq!(short_duration(Duration::from_secs(180)), "3m");
        assert_eq!(short_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(short_duration(Duration::from_secs(4 * 86400)), "4d");
        assert_eq!(
            duration(Some(&prost_types::Duration {
                seconds: 300,
                nanos: 0
            })),
            "5m"
        );
        assert_eq!(time(None), "");
        assert_eq!(
            duration(Some(&prost_types::Duration {
                seconds: 0,
                nanos: 4_213_833
            })),
            "4.2ms"
        );
    }
}
