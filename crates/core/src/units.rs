//! Durations like `5m` and sizes like `2G`, as workload files write them.
//!
//! Sizes follow Docker's own reading (`docker run --memory 2g` and compose's
//! `memory: 2G`): the suffixes are binary, so `2G` is 2 GiB. General-purpose
//! byte-size crates read `G` as 10^9, which would silently give containers
//! 7% less memory than the same compose file gives them under Docker; that
//! is why this parser exists.

use std::time::Duration;

/// Parses `5m`, `1h30m`, `250ms` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".to_owned());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write it like 30s, 5m or 1h30m"))
}

/// Formats a duration the way [`parse_duration`] reads it back.
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_owned();
    }
    humantime::format_duration(d).to_string().replace(' ', "")
}

/// Parses a byte size: a bare number of bytes, or a number with one of the
/// suffixes b, k, m, g, t (case-insensitive, optionally followed by `b`,
/// `i` or `ib`), all binary. `1.5G` is allowed.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let trimmed = s.trim();
    if trimmed.is_empty() {
        return Err("empty size".to_owned());
    }
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(split);
    let suffix = suffix.trim().to_ascii_lowercase();
    let unit: u64 = match suffix.as_str() {
        "" | "b" => 1,
        "k" | "kb" | "ki" | "kib" => 1 << 10,
        "m" | "mb" | "mi" | "mib" => 1 << 20,
        "g" | "gb" | "gi" | "gib" => 1 << 30,
        "t" | "tb" | "ti" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "{trimmed:?} has an unknown unit {suffix:?}; use b, k, m, g or t"
            ));
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{trimmed:?} is not a size; write it like 512M or 2G"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("{trimmed:?} is not a size"));
    }
    let bytes = value * unit as f64;
    // 2^63 keeps every size representable in SQLite's signed integers.
    if bytes >= 9.2e18 {
        return Err(format!("{trimmed:?} is too large"));
    }
    Ok(bytes.round() as u64)
}

/// Formats bytes with the largest binary unit that keeps one decimal.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("T", 1 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ];
    for (name, unit) in UNITS {
        if bytes >= unit {
            let value = bytes as f64 / unit as f64;
            return if bytes.is_multiple_of(unit) {
                format!("{}{name}", bytes / unit)
            } else {
                format!("{value:.1}{name}")
            };
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_use_dockers_binary_units() {
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("512mb").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("64k").unwrap(), 64 << 10);
        assert!(parse_size("").is_err());
        assert!(parse_size("2X").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("1.2.3G").is_err());
        assert!(parse_size("99999999T").is_err());
    }

    #[test]
    fn durations_parse_in_the_usual_forms() {
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn formatting_round_trips() {
        for d in [
            Duration::from_secs(0),
            Duration::from_secs(90),
            Duration::from_millis(1500),
            Duration::from_secs(3 * 3600 + 5),
        ] {
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
        assert_eq!(format_size(2 << 30), "2G");
        assert_eq!(format_size(1536 << 20), "1.5G");
        assert_eq!(format_size(100), "100B");
    }

    proptest! {
        #[test]
        fn size_parsing_never_panics(s in ".{0,40}") {
            let _ = parse_size(&s);
        }

        #[test]
        fn duration_parsing_never_panics(s in ".{0,40}") {
            let _ = parse_duration(&s);
        }

        /// Display rounds to one decimal, so a formatted size reads back
        /// within 5% of the original.
        #[test]
        fn formatted_sizes_read_back_close(bytes in 1u64..(1 << 50)) {
            let back = parse_size(&format_size(bytes)).unwrap();
            let error = (back as f64 - bytes as f64).abs() / bytes as f64;
            prop_assert!(error < 0.05, "{bytes} -> {} -> {back}", format_size(bytes));
        }
    }
}
