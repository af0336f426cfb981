//! The server's policy file (TOML), read into an [`AdmissionPolicy`].
//!
//! ```toml
//! # Directories every workload's local sinks may be in.
//! local_sink_roots = ["/srv/boilerhouse/sinks"]
//! # User-defined networks every workload may join.
//! network_modes = ["tenants"]
//!
//! # What one workload may ask for beyond the defaults.
//! [workloads.notebook]
//! allow_root = true
//! network_modes = ["host"]
//! cap_add = ["NET_ADMIN"]
//! allow_default_capabilities = true
//! allow_privilege_escalation = true
//! allow_unlimited_pids = true
//! local_sink_roots = ["./data/sync"]
//! ```
//!
//! Unknown keys are errors, as in every Boilerhouse file: a misspelt
//! allowance must not silently allow nothing, nor a misspelt restriction
//! silently allow everything.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Deserialize;

use super::{AdmissionPolicy, Allowances, LexicalPath, capability};
use crate::ids::WorkloadId;

/// A policy file that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    /// The file.
    pub file: String,
    /// Dotted key, e.g. `workloads.notebook.cap_add[0]`; empty when the
    /// TOML itself did not parse.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "policy file {}: {}", self.file, self.reason)
        } else {
            write!(
                f,
                "policy file {}: `{}`: {}",
                self.file, self.key, self.reason
            )
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    local_sink_roots: Vec<String>,
    #[serde(default)]
    network_modes: Vec<String>,
    #[serde(default)]
    workloads: BTreeMap<String, RawAllowances>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAllowances {
    #[serde(default)]
    allow_root: bool,
    #[serde(default)]
    network_modes: Vec<String>,
    #[serde(default)]
    cap_add: Vec<String>,
    #[serde(default)]
    allow_default_capabilities: bool,
    #[serde(default)]
    allow_privilege_escalation: bool,
    #[serde(default)]
    allow_unlimited_pids: bool,
    #[serde(default)]
    local_sink_roots: Vec<String>,
}

impl AdmissionPolicy {
    /// Parses and checks a policy file's text. `file` only labels errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, PolicyError> {
        let err = |key: String, reason: String| PolicyError {
            file: file.to_owned(),
            key,
            reason,
        };
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            err(
                String::new(),
                e.message().to_owned() + &location(text, e.span()),
            )
        })?;
        let local_sink_roots = roots("local_sink_roots", &raw.local_sink_roots)
            .map_err(|(key, reason)| err(key, reason))?;
        let mut network_modes = BTreeSet::new();
        for (i, mode) in raw.network_modes.iter().enumerate() {
            let key = format!("network_modes[{i}]");
            let mode = network_mode(mode).map_err(|reason| err(key.clone(), reason))?;
            if mode == "host" || mode.starts_with("container:") {
                return Err(err(
                    key,
                    format!(
                        "{mode:?} gives a container the host's or another container's network; allow it for one workload at a time under [workloads.<id>]"
                    ),
                ));
            }
            network_modes.insert(mode);
        }
        let mut workloads = BTreeMap::new();
        for (id, raw_allow) in raw.workloads {
            let section = format!("workloads.{id}");
            let workload = WorkloadId::new(id.clone()).map_err(|e| {
                err(
                    section.clone(),
                    format!("is not a workload id: {}", e.reason),
                )
            })?;
            let allow =
                allowances(&section, raw_allow).map_err(|(key, reason)| err(key, reason))?;
            workloads.insert(workload, allow);
        }
        Ok(Self {
            local_sink_roots,
            network_modes,
            workloads,
        })
    }
}

type KeyError = (String, String);

fn allowances(section: &str, raw: RawAllowances) -> Result<Allowances, KeyError> {
    let mut network_modes = BTreeSet::new();
    for (i, mode) in raw.network_modes.iter().enumerate() {
        let mode = network_mode(mode).map_err(|r| (format!("{section}.network_modes[{i}]"), r))?;
        network_modes.insert(mode);
    }
    let mut cap_add = BTreeSet::new();
    for (i, cap) in raw.cap_add.iter().enumerate() {
        let name = capability(cap);
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err((
                format!("{section}.cap_add[{i}]"),
                format!("{cap:?} is not a capability name such as NET_ADMIN (or ALL)"),
            ));
        }
        cap_add.insert(name);
    }
    Ok(Allowances {
        allow_root: raw.allow_root,
        network_modes,
        cap_add,
        allow_default_capabilities: raw.allow_default_capabilities,
        allow_privilege_escalation: raw.allow_privilege_escalation,
        allow_unlimited_pids: raw.allow_unlimited_pids,
        local_sink_roots: roots(
            &format!("{section}.local_sink_roots"),
            &raw.local_sink_roots,
        )?,
    })
}

fn roots(key: &str, raw: &[String]) -> Result<Vec<LexicalPath>, KeyError> {
    raw.iter()
        .enumerate()
        .map(|(i, root)| LexicalPath::parse(root).map_err(|r| (format!("{key}[{i}]"), r)))
        .collect()
}

fn network_mode(mode: &str) -> Result<String, String> {
    let mode = mode.trim();
    if mode.is_empty() || mode == "container:" {
        return Err("must name a network mode".to_owned());
    }
    Ok(mode.to_owned())
}

/// ` at line L, column C` for a TOML error span, so a reader can find it.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!(" (line {line}, column {column})")
}
