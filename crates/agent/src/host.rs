//! Facts about the host that the engine does not report.

/// The kernel's boot id: it changes on reboot, which tells the server a
/// reboot (containers gone) from an agent restart (containers kept).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// GPUs on the host: NVIDIA device nodes `/dev/nvidia<N>`. Zero on hosts
/// without them.
pub fn gpu_count() -> u32 {
    let Ok(entries) = std::fs::read_dir("/dev") else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix("nvidia")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .count() as u32
}

#[cfg(test)]
mod tests {
    #[test]
    fn boot_id_is_read_on_linux() {
        if std::path::Path::new("/proc/sys/kernel/random/boot_id").exists() {
            assert_eq!(super::boot_id().len(), 36, "a UUID");
        }
    }
}
