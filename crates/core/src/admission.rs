//! Admission: what a workload may ask of the hosts it runs on.
//!
//! Validation ([`crate::workload`]) decides whether a file means something;
//! admission decides whether this installation lets it run. A workload can
//! be perfectly valid and still ask to run as root with the host's network,
//! extra capabilities and a sink in `/etc`: each of those hands a tenant
//! part of the host, so each is refused unless an operator allows it on
//! purpose.
//!
//! The rules live here once, as [`risks`] of a container's settings. Two
//! parties apply them with their own allowances and their own words:
//! - the server, with the [`AdmissionPolicy`] of its policy file, before a
//!   workload is stored (see [`AdmissionPolicy::check`]);
//! - every agent, with its own flags, before it creates a container, so a
//!   compromised server cannot take a host by itself.
//!
//! Local sink paths are compared lexically here ([`LexicalPath`]): the
//! server never sees the agent's filesystem, so it cannot resolve symlinks.
//! The agent resolves the real path and enforces where files really go.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::container::ContainerSpec;
use crate::ids::WorkloadId;
use crate::workload::{SyncSink, WorkloadSpec};

mod policy_file;

pub use policy_file::PolicyError;

/// Network modes every container may use: they give it no view of the host
/// or of another container.
const SAFE_NETWORK_MODES: &[&str] = &["none", "bridge", "default"];

/// The security-relevant settings of a container, borrowed from a workload
/// or from a container spec, so both are judged by the same rules.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    /// Docker's `user`; `None` runs the image's own user.
    pub user: Option<&'a str>,
    /// Docker's network mode; `None` is the engine's default (bridge).
    pub network_mode: Option<&'a str>,
    /// Capabilities added.
    pub cap_add: &'a [String],
    /// Capabilities dropped.
    pub cap_drop: &'a [String],
    /// `no-new-privileges`.
    pub no_new_privileges: bool,
    /// Process limit; zero or less is unlimited.
    pub pids_limit: i64,
}

impl<'a> Settings<'a> {
    /// The settings a workload asks for.
    pub fn of_workload(spec: &'a WorkloadSpec) -> Self {
        Self {
            user: spec.user.as_deref(),
            network_mode: spec.network_mode.as_deref(),
            cap_add: &spec.security.cap_add,
            cap_drop: &spec.security.cap_drop,
            no_new_privileges: spec.security.no_new_privileges,
            pids_limit: spec.security.pids_limit,
        }
    }

    /// The settings a create command asks for.
    pub fn of_container(spec: &'a ContainerSpec) -> Self {
        Self {
            user: spec.user.as_deref(),
            network_mode: spec.network_mode.as_deref(),
            cap_add: &spec.cap_add,
            cap_drop: &spec.cap_drop,
            no_new_privileges: spec.no_new_privileges,
            pids_limit: spec.pids_limit,
        }
    }
}

/// One way a container's settings give it more of the host than a
/// hardened default would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Risk {
    /// `user` names uid 0 or `root`.
    RootUser(String),
    /// No `user`: the image's own user runs, and that may be root.
    ImageUser,
    /// `network_mode: host`: the host's interfaces and ports.
    HostNetwork,
    /// `network_mode: container:<name>`: another container's network
    /// namespace, which may be the host's.
    ContainerNetwork(String),
    /// A user-defined network, reachable by whatever else is on it.
    OtherNetwork(String),
    /// A capability added back (normalised, without `CAP_`).
    AddedCapability(String),
    /// `cap_drop` lacks `ALL`, so Docker's default capabilities remain.
    DefaultCapabilities,
    /// `no_new_privileges` is off: setuid binaries can raise privileges.
    PrivilegeEscalation,
    /// No process limit: a fork bomb takes the host's process table.
    UnlimitedPids(i64),
}

impl Risk {
    /// The workload field that asks for it, as the YAML names it.
    pub fn workload_field(&self) -> &'static str {
        match self {
            Risk::RootUser(_) => "user",
            Risk::ImageUser => "security.non_root",
            Risk::HostNetwork | Risk::ContainerNetwork(_) | Risk::OtherNetwork(_) => "network_mode",
            Risk::AddedCapability(_) => "security.cap_add",
            Risk::DefaultCapabilities => "security.cap_drop",
            Risk::PrivilegeEscalation => "security.no_new_privileges",
            Risk::UnlimitedPids(_) => "security.pids_limit",
        }
    }

    /// The container spec field that asks for it.
    pub fn container_field(&self) -> &'static str {
        match self {
            Risk::RootUser(_) | Risk::ImageUser => "user",
            Risk::HostNetwork | Risk::ContainerNetwork(_) | Risk::OtherNetwork(_) => "network_mode",
            Risk::AddedCapability(_) => "cap_add",
            Risk::DefaultCapabilities => "cap_drop",
            Risk::PrivilegeEscalation => "no_new_privileges",
            Risk::UnlimitedPids(_) => "pids_limit",
        }
    }
}

impl fmt::Display for Risk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Risk::RootUser(user) => write!(f, "runs as root (user {user:?})"),
            Risk::ImageUser => {
                f.write_str("sets no user, so the image's own user runs, and that may be root")
            }
            Risk::HostNetwork => f.write_str("shares the host's network (network_mode host)"),
            Risk::ContainerNetwork(mode) => write!(
                f,
                "joins another container's network namespace (network_mode {mode:?})"
            ),
            Risk::OtherNetwork(mode) => write!(f, "joins network {mode:?}"),
            Risk::AddedCapability(cap) => write!(f, "adds capability {cap}"),
            Risk::DefaultCapabilities => {
                f.write_str("does not drop ALL capabilities, so Docker's defaults remain")
            }
            Risk::PrivilegeEscalation => {
                f.write_str("turns no_new_privileges off, so setuid programs can gain privileges")
            }
            Risk::UnlimitedPids(limit) => {
                write!(f, "has no process limit (pids_limit {limit})")
            }
        }
    }
}

/// Whether `user` (Docker's `uid[:gid]` or `name[:group]`) is root. Only
/// uid 0 and the name `root` are known to be; other names are resolved in
/// the image, which neither server nor agent reads. The runtime parses a
/// uid with Go's `Atoi`, which takes a sign, so `+0` and `-0` are uid 0 too.
pub fn is_root_user(user: &str) -> bool {
    let name = user.split(':').next().unwrap_or_default().trim();
    let digits = name.strip_prefix(['+', '-']).unwrap_or(name);
    name == "root" || (!digits.is_empty() && digits.bytes().all(|b| b == b'0'))
}

/// A capability as Docker compares them: upper case, without `CAP_`.
pub fn capability(name: &str) -> String {
    let upper = name.trim().to_ascii_uppercase();
    upper.strip_prefix("CAP_").unwrap_or(&upper).to_owned()
}

/// Everything in `settings` that goes beyond the hardened defaults, in the
/// order of the workload file.
pub fn risks(settings: &Settings<'_>) -> Vec<Risk> {
    let mut out = Vec::new();
    match settings.user.map(str::trim).filter(|u| !u.is_empty()) {
        Some(user) if is_root_user(user) => out.push(Risk::RootUser(user.to_owned())),
        Some(_) => {}
        None => out.push(Risk::ImageUser),
    }
    match settings
        .network_mode
        .map(str::trim)
        .filter(|m| !m.is_empty())
    {
        None => {}
        Some(mode) if SAFE_NETWORK_MODES.contains(&mode) => {}
        Some("host") => out.push(Risk::HostNetwork),
        Some(mode) if mode.starts_with("container:") => {
            out.push(Risk::ContainerNetwork(mode.to_owned()));
        }
        Some(mode) => out.push(Risk::OtherNetwork(mode.to_owned())),
    }
    let added: BTreeSet<String> = settings.cap_add.iter().map(|c| capability(c)).collect();
    out.extend(added.into_iter().map(Risk::AddedCapability));
    if !settings.cap_drop.iter().any(|c| capability(c) == "ALL") {
        out.push(Risk::DefaultCapabilities);
    }
    if !settings.no_new_privileges {
        out.push(Risk::PrivilegeEscalation);
    }
    if settings.pids_limit <= 0 {
        out.push(Risk::UnlimitedPids(settings.pids_limit));
    }
    out
}

/// A path as written, normalised without touching a filesystem: `.` and
/// empty components dropped, `..` refused (it could climb out of any root).
/// A relative path stays relative; it only ever matches relative roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LexicalPath {
    /// Starts at `/`.
    pub absolute: bool,
    /// The components.
    pub parts: Vec<String>,
}

impl LexicalPath {
    /// Normalises `path`.
    pub fn parse(path: &str) -> Result<Self, String> {
        if path.trim().is_empty() {
            return Err("is empty".to_owned());
        }
        if path.contains('\0') {
            return Err(format!("{path:?} contains a NUL"));
        }
        let mut parts = Vec::new();
        for part in path.split('/') {
            match part {
                "" | "." => {}
                ".." => return Err(format!("{path:?} must not contain '..'")),
                p => parts.push(p.to_owned()),
            }
        }
        Ok(Self {
            absolute: path.starts_with('/'),
            parts,
        })
    }

    /// Whether `self` is `root` or lies beneath it.
    pub fn is_under(&self, root: &LexicalPath) -> bool {
        self.absolute == root.absolute && self.parts.starts_with(&root.parts)
    }
}

impl fmt::Display for LexicalPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.absolute, self.parts.is_empty()) {
            (true, _) => write!(f, "/{}", self.parts.join("/")),
            (false, true) => f.write_str("."),
            (false, false) => f.write_str(&self.parts.join("/")),
        }
    }
}

/// What an operator allows one workload beyond the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowances {
    /// May run as root, or as the image's own user.
    pub allow_root: bool,
    /// Network modes besides none, bridge and default (`host`,
    /// `container:<name>`, a network's name).
    pub network_modes: BTreeSet<String>,
    /// Capabilities it may add (normalised); `ALL` allows any.
    pub cap_add: BTreeSet<String>,
    /// May keep Docker's default capabilities (no `ALL` in `cap_drop`).
    pub allow_default_capabilities: bool,
    /// May turn `no_new_privileges` off.
    pub allow_privilege_escalation: bool,
    /// May run without a process limit.
    pub allow_unlimited_pids: bool,
    /// Further directories its local sinks may be in.
    pub local_sink_roots: Vec<LexicalPath>,
}

/// The server's admission policy. [`Default`] is the strict default: no
/// local sinks, no networks beyond none/bridge/default, no allowances.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdmissionPolicy {
    /// Directories every workload's local sinks may be in.
    pub local_sink_roots: Vec<LexicalPath>,
    /// User-defined networks every workload may join.
    pub network_modes: BTreeSet<String>,
    /// Per-workload allowances.
    pub workloads: BTreeMap<WorkloadId, Allowances>,
}

/// One thing the policy refuses, with the field that asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Dotted field path in the workload file.
    pub field: String,
    /// What is refused and which policy key would allow it.
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}`: {}", self.field, self.reason)
    }
}

impl AdmissionPolicy {
    /// Everything the policy refuses in `spec`; empty when it is admitted.
    pub fn check(&self, spec: &WorkloadSpec) -> Vec<Refusal> {
        let none = Allowances::default();
        let allow = self.workloads.get(&spec.id).unwrap_or(&none);
        let section = format!("[workloads.{}]", spec.id);
        let mut out: Vec<Refusal> = risks(&Settings::of_workload(spec))
            .into_iter()
            .filter_map(|risk| {
                let hint = self.hint(&risk, allow, &section)?;
                Some(Refusal {
                    field: risk.workload_field().to_owned(),
                    reason: format!(
                        "{risk}; the admission policy refuses this unless the server's policy file sets {hint}"
                    ),
                })
            })
            .collect();
        if let Some(SyncSink::Local { path, .. }) = spec.sync.as_ref().map(|s| &s.sink)
            && let Some(reason) = self.sink_refusal(path, allow, &section)
        {
            out.push(Refusal {
                field: "sync.sink.path".to_owned(),
                reason,
            });
        }
        out
    }

    /// `None` when `allow` (or the whole policy) allows `risk`; else the
    /// key that would.
    fn hint(&self, risk: &Risk, allow: &Allowances, section: &str) -> Option<String> {
        let allowed = match risk {
            Risk::RootUser(_) | Risk::ImageUser => allow.allow_root,
            Risk::HostNetwork => allow.network_modes.contains("host"),
            Risk::ContainerNetwork(mode) => allow.network_modes.contains(mode),
            Risk::OtherNetwork(mode) => {
                allow.network_modes.contains(mode) || self.network_modes.contains(mode)
            }
            Risk::AddedCapability(cap) => {
                allow.cap_add.contains(cap) || allow.cap_add.contains("ALL")
            }
            Risk::DefaultCapabilities => allow.allow_default_capabilities,
            Risk::PrivilegeEscalation => allow.allow_privilege_escalation,
            Risk::UnlimitedPids(_) => allow.allow_unlimited_pids,
        };
        if allowed {
            return None;
        }
        Some(match risk {
            Risk::RootUser(_) | Risk::ImageUser => format!("`allow_root = true` under {section}"),
            Risk::HostNetwork => format!("`network_modes = [\"host\"]` under {section}"),
            Risk::ContainerNetwork(mode) => {
                format!("`network_modes = [{mode:?}]` under {section}")
            }
            Risk::OtherNetwork(mode) => format!(
                "`network_modes = [{mode:?}]` under {section}, or at the top level for every workload"
            ),
            Risk::AddedCapability(cap) => format!("`cap_add = [{cap:?}]` under {section}"),
            Risk::DefaultCapabilities => {
                format!("`allow_default_capabilities = true` under {section}")
            }
            Risk::PrivilegeEscalation => {
                format!("`allow_privilege_escalation = true` under {section}")
            }
            Risk::UnlimitedPids(_) => format!("`allow_unlimited_pids = true` under {section}"),
        })
    }

    fn sink_refusal(&self, path: &str, allow: &Allowances, section: &str) -> Option<String> {
        let sink = match LexicalPath::parse(path) {
            Ok(sink) => sink,
            Err(why) => return Some(format!("local sink {why}")),
        };
        let roots: Vec<&LexicalPath> = self
            .local_sink_roots
            .iter()
            .chain(&allow.local_sink_roots)
            .collect();
        if roots.iter().any(|root| sink.is_under(root)) {
            return None;
        }
        let keys = format!(
            "`local_sink_roots` at the top level of the server's policy file (every workload) or under {section}"
        );
        if roots.is_empty() {
            return Some(format!(
                "local sink {path:?}: the admission policy allows no local sinks until {keys} lists a directory holding it"
            ));
        }
        let listed: Vec<String> = roots
            .iter()
            .map(|r| format!("{:?}", r.to_string()))
            .collect();
        Some(format!(
            "local sink {path:?} is not under an allowed root ({}); add a directory holding it to {keys}",
            listed.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests;
