//! Tenant activity: changes to files in a container's state directory.
//!
//! The server's idle reaper releases claims nobody uses. A tenant working
//! inside its container writes files without calling Touch, so the agent
//! watches every container's `state/` directory and reports an Activity
//! event per container, at most once per second. The state file itself
//! lives outside `state/`, so the agent's own writes never count.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use notify::Watcher as _;
use tokio::sync::mpsc;

use boilerhouse_core::ContainerId;

/// Reports per container are at least this far apart.
const DEBOUNCE: Duration = Duration::from_secs(1);

/// The container whose state directory `path` is in, if any.
pub fn container_of(containers_root: &Path, path: &Path) -> Option<ContainerId> {
    let relative = path.strip_prefix(containers_root).ok()?;
    let mut parts = relative.components();
    let Some(Component::Normal(id)) = parts.next() else {
        return None;
    };
    let Some(Component::Normal(dir)) = parts.next() else {
        return None;
    };
    if dir != "state" {
        return None;
    }
    id.to_str()?.parse().ok()
}

/// Watches `<state_root>/containers` and sends the id of each container
/// whose state directory changed. The watcher lives as long as the
/// returned guard.
pub fn watch(
    state_root: &Path,
    activity: mpsc::Sender<ContainerId>,
) -> notify::Result<notify::RecommendedWatcher> {
    let root: PathBuf = state_root.join("containers");
    std::fs::create_dir_all(&root).map_err(notify::Error::io)?;
    let base = root.clone();
    let mut last: HashMap<ContainerId, Instant> = HashMap::new();
    let mut watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
        let Ok(event) = result else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        for path in &event.paths {
            let Some(id) = container_of(&base, path) else {
                continue;
            };
            let now = Instant::now();
            if last
                .get(&id)
                .is_some_and(|t| now.duration_since(*t) < DEBOUNCE)
            {
                continue;
            }
            last.insert(id, now);
            // Between sessions nobody reads; dropping is fine, the next
            // change reports again.
            let _ = activity.try_send(id);
        }
    })?;
    watcher.watch(&root, notify::RecursiveMode::Recursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_under_a_containers_state_directory_count() {
        let root = Path::new("/r/containers");
        let id = ContainerId::from_uuid(boilerhouse_core::ids::Uuid::nil());
        let inside = root.join(id.to_string()).join("state/notes/a.txt");
        assert_eq!(container_of(root, &inside), Some(id));
        assert_eq!(
            container_of(
                root,
                &root.join(id.to_string()).join("boilerhouse-state.json")
            ),
            None
        );
        assert_eq!(
            container_of(root, &root.join(id.to_string()).join("comm/sock")),
            None
        );
        assert_eq!(container_of(root, Path::new("/elsewhere/x")), None);
        assert_eq!(container_of(root, &root.join("not-an-id/state/x")), None);
    }

    #[tokio::test]
    async fn a_write_in_a_state_directory_reports_its_container() {
        let dir = tempfile::tempdir().unwrap();
        let id = ContainerId::from_uuid(boilerhouse_core::ids::Uuid::now_v7());
        let state = dir
            .path()
            .join("containers")
            .join(id.to_string())
            .join("state");
        std::fs::create_dir_all(&state).unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let _watcher = watch(dir.path(), tx).unwrap();
        std::fs::write(
            dir.path()
                .join("containers")
                .join(id.to_string())
                .join("boilerhouse-state.json"),
            b"{}",
        )
        .unwrap();
        std::fs::write(state.join("work.txt"), b"hello").unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen, id);
    }
}
