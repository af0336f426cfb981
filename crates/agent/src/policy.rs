//! The agent's own local policy: what it will create and where it will
//! write, whatever the server asks.
//!
//! The server admits workloads by its policy file, but a server that is
//! compromised (or simply wrong) could still send any container spec or
//! sink. The agent therefore judges every create by the same rules
//! (`boilerhouse_core::admission::risks`) against its own flags, and lets
//! local sinks write only beneath its own sink roots. Holding the server
//! is then not enough to become root on a host: the host's operator must
//! have allowed it on that host too.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use boilerhouse_core::admission::{LexicalPath, Risk, Settings, capability, risks};
use boilerhouse_core::container::ContainerSpec;

/// The policy's flags, flattened into the agent's arguments.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PolicyArgs {
    /// A directory local sync sinks may write beneath; repeatable. Sinks
    /// anywhere else are refused. Default: <state-root>/sinks only.
    #[arg(
        long = "allow-sink-root",
        env = "BOILERHOUSE_ALLOW_SINK_ROOTS",
        value_delimiter = ','
    )]
    pub sink_roots: Vec<PathBuf>,
    /// Create containers that run as root (user 0 or root), or as the
    /// image's own user when no user is set.
    #[arg(long, env = "BOILERHOUSE_ALLOW_ROOT")]
    pub allow_root: bool,
    /// Create containers with `network_mode: host`.
    #[arg(long, env = "BOILERHOUSE_ALLOW_HOST_NETWORK")]
    pub allow_host_network: bool,
    /// Create containers with `network_mode: container:<name>`, which share
    /// another container's network namespace (perhaps the host's).
    #[arg(long, env = "BOILERHOUSE_ALLOW_CONTAINER_NETWORK")]
    pub allow_container_network: bool,
    /// A capability containers may add (NET_ADMIN, or ALL for any);
    /// repeatable.
    #[arg(
        long = "allow-cap-add",
        env = "BOILERHOUSE_ALLOW_CAP_ADD",
        value_delimiter = ','
    )]
    pub cap_add: Vec<String>,
    /// Create containers that keep Docker's default capabilities (no ALL
    /// in cap_drop).
    #[arg(long, env = "BOILERHOUSE_ALLOW_DEFAULT_CAPABILITIES")]
    pub allow_default_capabilities: bool,
    /// Create containers without no-new-privileges.
    #[arg(long, env = "BOILERHOUSE_ALLOW_PRIVILEGE_ESCALATION")]
    pub allow_privilege_escalation: bool,
    /// Create containers without a process limit.
    #[arg(long, env = "BOILERHOUSE_ALLOW_UNLIMITED_PIDS")]
    pub allow_unlimited_pids: bool,
}

/// The validated local policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPolicy {
    /// Directories local sinks may write beneath: absolute from
    /// [`LocalPolicy::from_args`], canonical after [`LocalPolicy::prepare`].
    /// Before that a root behind a symlink matches nothing, which refuses
    /// more, never less.
    sink_roots: Vec<PathBuf>,
    allow_root: bool,
    allow_host_network: bool,
    allow_container_network: bool,
    /// Normalised capability names; `ALL` allows any.
    cap_add: BTreeSet<String>,
    allow_default_capabilities: bool,
    allow_privilege_escalation: bool,
    allow_unlimited_pids: bool,
}

impl LocalPolicy {
    /// Validates the flags, without touching the filesystem (see
    /// [`LocalPolicy::prepare`]). The default sink root is
    /// `<state_root>/sinks`.
    pub fn from_args(args: &PolicyArgs, state_root: &Path) -> Result<Self, String> {
        let given: Vec<PathBuf> = args
            .sink_roots
            .iter()
            .filter(|p| !p.as_os_str().is_empty())
            .cloned()
            .collect();
        let wanted = if given.is_empty() {
            vec![state_root.join("sinks")]
        } else {
            given
        };
        let mut sink_roots = Vec::new();
        for root in wanted {
            let absolute = std::path::absolute(&root)
                .map_err(|e| format!("--allow-sink-root {}: {e}", root.display()))?;
            sink_roots.push(absolute);
        }
        let mut cap_add = BTreeSet::new();
        for cap in args.cap_add.iter().filter(|c| !c.trim().is_empty()) {
            let name = capability(cap);
            if !name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(format!(
                    "--allow-cap-add {cap:?} is not a capability name such as NET_ADMIN (or ALL)"
                ));
            }
            cap_add.insert(name);
        }
        Ok(Self {
            sink_roots,
            allow_root: args.allow_root,
            allow_host_network: args.allow_host_network,
            allow_container_network: args.allow_container_network,
            cap_add,
            allow_default_capabilities: args.allow_default_capabilities,
            allow_privilege_escalation: args.allow_privilege_escalation,
            allow_unlimited_pids: args.allow_unlimited_pids,
        })
    }

    /// Creates the sink roots if missing and resolves them to their real
    /// paths, once at startup, so every later check compares real paths.
    pub fn prepare(&mut self) -> Result<(), String> {
        for root in &mut self.sink_roots {
            *root = std::fs::create_dir_all(&*root)
                .and_then(|()| root.canonicalize())
                .map_err(|e| format!("--allow-sink-root {}: {e}", root.display()))?;
        }
        Ok(())
    }

    /// The sink roots.
    pub fn sink_roots(&self) -> &[PathBuf] {
        &self.sink_roots
    }

    /// The flag that would allow `risk`, or `None` when it is allowed.
    /// User-defined networks are the server's business: joining one gives
    /// a container nothing of the host.
    fn flag_for(&self, risk: &Risk) -> Option<String> {
        let (allowed, flag) = match risk {
            Risk::RootUser(_) | Risk::ImageUser => (self.allow_root, "--allow-root".to_owned()),
            Risk::HostNetwork => (self.allow_host_network, "--allow-host-network".to_owned()),
            Risk::ContainerNetwork(_) => (
                self.allow_container_network,
                "--allow-container-network".to_owned(),
            ),
            Risk::OtherNetwork(_) => (true, String::new()),
            Risk::AddedCapability(cap) => (
                self.cap_add.contains(cap) || self.cap_add.contains("ALL"),
                format!("--allow-cap-add {cap}"),
            ),
            Risk::DefaultCapabilities => (
                self.allow_default_capabilities,
                "--allow-default-capabilities".to_owned(),
            ),
            Risk::PrivilegeEscalation => (
                self.allow_privilege_escalation,
                "--allow-privilege-escalation".to_owned(),
            ),
            Risk::UnlimitedPids(_) => (
                self.allow_unlimited_pids,
                "--allow-unlimited-pids".to_owned(),
            ),
        };
        (!allowed).then_some(flag)
    }

    /// Whether this agent will create `spec`; the error names each refused
    /// field and the flag that would allow it.
    pub fn check_create(&self, spec: &ContainerSpec) -> Result<(), String> {
        let refused: Vec<String> = risks(&Settings::of_container(spec))
            .into_iter()
            .filter_map(|risk| {
                let flag = self.flag_for(&risk)?;
                Some(format!(
                    "field {}: {risk}; start the agent with {flag} to allow it",
                    risk.container_field()
                ))
            })
            .collect();
        if refused.is_empty() {
            return Ok(());
        }
        Err(format!(
            "refused by this agent's local policy: {}",
            refused.join("; ")
        ))
    }

    /// The real directory for a local sink at `path` (relative paths are
    /// the agent's working directory's), created if missing. It must lie
    /// beneath a sink root once every symlink is resolved; the check runs
    /// before the directory is created, and again on the created directory
    /// in case a link appeared in between.
    pub fn sink_dir(&self, path: &str) -> Result<PathBuf, String> {
        let lexical = LexicalPath::parse(path).map_err(|why| format!("local sink {why}"))?;
        let mut wanted = if lexical.absolute {
            PathBuf::from("/")
        } else {
            std::env::current_dir()
                .map_err(|e| format!("local sink {path:?}: no working directory: {e}"))?
        };
        wanted.extend(&lexical.parts);
        let resolved = resolve_existing_prefix(&wanted).map_err(|e| {
            format!(
                "local sink {path:?}: cannot resolve {}: {e}",
                wanted.display()
            )
        })?;
        self.beneath_a_root(path, &resolved)?;
        std::fs::create_dir_all(&resolved).map_err(|e| {
            format!(
                "cannot create local sink directory {}: {e}",
                resolved.display()
            )
        })?;
        let real = resolved.canonicalize().map_err(|e| {
            format!(
                "local sink {path:?}: cannot resolve {}: {e}",
                resolved.display()
            )
        })?;
        self.beneath_a_root(path, &real)?;
        Ok(real)
    }

    fn beneath_a_root(&self, path: &str, real: &Path) -> Result<(), String> {
        if self.sink_roots.iter().any(|root| real.starts_with(root)) {
            return Ok(());
        }
        let roots: Vec<String> = self
            .sink_roots
            .iter()
            .map(|r| r.display().to_string())
            .collect();
        Err(format!(
            "refused by this agent's local policy: local sink {path:?} is {}, outside the agent's sink roots ({}); start the agent with --allow-sink-root DIR for a directory holding it",
            real.display(),
            roots.join(", ")
        ))
    }
}

/// `path` with its longest existing ancestor canonicalised (symlinks
/// resolved) and the missing rest appended as written. The rest has no
/// `..` (the caller parsed it lexically), so it can only go deeper.
fn resolve_existing_prefix(path: &Path) -> std::io::Result<PathBuf> {
    let mut existing = path;
    let mut missing = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(real) => {
                let mut out = real;
                out.extend(missing.iter().rev());
                return Ok(out);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Err(e);
                };
                missing.push(name.to_owned());
                existing = parent;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests;
