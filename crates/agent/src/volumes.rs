//! Host directories of managed containers, and their state files.
//!
//! Layout under the agent's state root:
//!
//! ```text
//! containers/<container-id>/state/          bind-mounted: the tenant's files
//! containers/<container-id>/secrets/        bind-mounted, read-only by default
//! containers/<container-id>/comm/           bind-mounted
//! containers/<container-id>/custom/<name>/  bind-mounted
//! containers/<container-id>/boilerhouse-state.json
//! ```
//!
//! The state file sits *beside* the mounted directories, not inside the
//! state volume: a tenant can write anything in its own volume, and a file
//! the tenant could edit must not be what rebuilds tenant assignments after
//! the database is lost.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use boilerhouse_core::ContainerId;
use boilerhouse_core::container::{ContainerSpec, StateFile, VolumeKind};

use crate::runtime::Bind;

const STATE_FILE: &str = "boilerhouse-state.json";

/// Where a node's container directories live.
#[derive(Debug, Clone)]
pub struct VolumeLayout {
    root: PathBuf,
}

impl VolumeLayout {
    /// Directories under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Where the containers' directories are.
    pub fn containers_dir(&self) -> PathBuf {
        self.root.join("containers")
    }

    /// The directory of one container.
    pub fn container_dir(&self, id: &ContainerId) -> PathBuf {
        self.containers_dir().join(id.to_string())
    }

    /// The host path of one of its volumes; the layout is defined once, in
    /// `core`, because the server computes the same paths.
    pub fn volume_dir(&self, id: &ContainerId, kind: &VolumeKind) -> PathBuf {
        PathBuf::from(boilerhouse_core::container::volume_host_path(
            &self.root.display().to_string(),
            id,
            kind,
        ))
    }

    /// Its state file.
    pub fn state_file(&self, id: &ContainerId) -> PathBuf {
        self.container_dir(id).join(STATE_FILE)
    }

    /// Creates the container's directories, owned by the user it runs as so
    /// a non-root container can write its own volumes, and returns the
    /// binds. Idempotent.
    pub fn prepare(&self, spec: &ContainerSpec) -> std::io::Result<Vec<Bind>> {
        let base = self.container_dir(&spec.container_id);
        std::fs::create_dir_all(&base)?;
        // The container directory itself stays private to the agent; only
        // the volume directories inside it are mounted.
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o711))?;
        let owner = numeric_owner(spec.user.as_deref());
        let mut binds = Vec::new();
        for volume in &spec.volumes {
            let dir = self.volume_dir(&spec.container_id, &volume.kind);
            std::fs::create_dir_all(&dir)?;
            match owner {
                Some((uid, gid)) => {
                    std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750))?;
                }
                // A user given by name cannot be resolved without the
                // image's passwd file; let any user in the container write.
                None if spec.user.is_some() => {
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
                }
                None => {}
            }
            binds.push(Bind {
                host_path: dir.display().to_string(),
                target: volume.target.clone(),
                read_only: volume.read_only,
            });
        }
        Ok(binds)
    }

    /// Makes the container's own directory if it is missing, private to
    /// the agent as [`VolumeLayout::prepare`] makes it; its volumes are
    /// left alone.
    pub fn ensure_container_dir(&self, id: &ContainerId) -> std::io::Result<()> {
        let dir = self.container_dir(id);
        if dir.is_dir() {
            return Ok(());
        }
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))
    }

    /// Deletes the container's directories.
    pub fn remove(&self, id: &ContainerId) -> std::io::Result<()> {
        match std::fs::remove_dir_all(self.container_dir(id)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Reads the state file; `None` when missing or unreadable (a report
    /// must not fail because one file is damaged).
    pub fn read_state(&self, id: &ContainerId) -> Option<StateFile> {
        crate::state_files::read_state(self, id)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// `uid[:gid]` when both parts are numbers.
fn numeric_owner(user: Option<&str>) -> Option<(u32, u32)> {
    let user = user?;
    let (uid, gid) = match user.split_once(':') {
        Some((u, g)) => (u, g),
        None => (user, user),
    };
    Some((uid.parse().ok()?, gid.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use boilerhouse_core::container::VolumeMount;
    use boilerhouse_core::{NodeId, TenantId, Timestamp};

    fn spec(user: Option<&str>) -> ContainerSpec {
        let workload = boilerhouse_core::workload::parse_workload(
            "w",
            "id: w\nimage: i\nvolumes: {state: {target: /s}, secrets: {target: /k}}\n",
        )
        .unwrap();
        let mut spec = ContainerSpec::for_workload(
            &workload,
            ContainerId::from_uuid(boilerhouse_core::ids::Uuid::now_v7()),
            &NodeId::new("n").unwrap(),
            Timestamp::from_millis(1),
        );
        spec.user = user.map(str::to_owned);
        spec
    }

    #[test]
    fn prepare_creates_each_volume_and_binds_it() {
        let dir = tempfile::tempdir().unwrap();
        let layout = VolumeLayout::new(dir.path());
        let spec = spec(None);
        let binds = layout.prepare(&spec).unwrap();
        assert_eq!(binds.len(), 2);
        assert!(Path::new(&binds[0].host_path).is_dir());
        assert_eq!(binds[0].target, "/s");
        assert!(!binds[0].read_only);
        assert!(binds[1].read_only, "secrets are read-only");
        assert_eq!(layout.prepare(&spec).unwrap(), binds, "idempotent");
        layout.remove(&spec.container_id).unwrap();
        assert!(!layout.container_dir(&spec.container_id).exists());
        layout.remove(&spec.container_id).unwrap();
    }

    #[test]
    fn the_state_file_is_written_atomically_outside_the_mounted_volume() {
        let dir = tempfile::tempdir().unwrap();
        let layout = VolumeLayout::new(dir.path());
        let spec = spec(None);
        layout.prepare(&spec).unwrap();
        let id = spec.container_id;
        assert!(layout.read_state(&id).is_none());
        let state = StateFile {
            tenant_id: Some(TenantId::new("t1").unwrap()),
            claim_generation: 4,
            ..Default::default()
        };
        let mut writer = crate::state_files::GroupWriter::open(layout.clone());
        for written in writer.write_group(&[(id, &state)]) {
            written.unwrap();
        }
        assert_eq!(layout.read_state(&id), Some(state));
        let state_dir = layout.volume_dir(&id, &VolumeKind::State);
        assert!(
            !layout.state_file(&id).starts_with(&state_dir),
            "the tenant cannot edit it"
        );
        std::fs::write(layout.state_file(&id), b"{not json").unwrap();
        assert!(
            layout.read_state(&id).is_none(),
            "a damaged file reads as absent"
        );
    }

    #[test]
    fn numeric_users_own_their_volumes() {
        assert_eq!(numeric_owner(Some("1000:1001")), Some((1000, 1001)));
        assert_eq!(numeric_owner(Some("65534")), Some((65534, 65534)));
        assert_eq!(numeric_owner(Some("app")), None);
        assert_eq!(numeric_owner(None), None);
        let _ = VolumeMount {
            kind: VolumeKind::State,
            target: "/x".into(),
            read_only: false,
        };
    }
}
