//! Workload admission on the server: reading the policy file, and turning
//! refusals into the errors the loader and ApplyWorkload report.
//!
//! The rules are `boilerhouse_core::admission`'s. A refused workload is
//! treated like an invalid one: the loader reports the file (log line,
//! `workload.invalid` event, ListWorkloads) and ApplyWorkload answers
//! INVALID_ARGUMENT with one field violation per refused field. Both name
//! the field and the policy key that would allow it.

use std::path::{Path, PathBuf};

use boilerhouse_core::admission::{AdmissionPolicy, PolicyError, Refusal};
use boilerhouse_core::workload::WorkloadError;

/// A policy file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    /// It cannot be read.
    #[error("cannot read policy file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a valid policy; the error names file, key and reason.
    #[error(transparent)]
    Invalid(#[from] PolicyError),
}

/// Reads the policy file, or the strict defaults when there is none. The
/// file is read once, at startup: changing it takes a restart, so a policy
/// never changes under a running reload.
pub fn load_policy(path: Option<&Path>) -> Result<AdmissionPolicy, PolicyFileError> {
    let Some(path) = path else {
        return Ok(AdmissionPolicy::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| PolicyFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(AdmissionPolicy::parse(&path.display().to_string(), &text)?)
}

/// One error for a refused workload file, in the loader's terms: the first
/// refused field, and every refusal in the reason so one edit can fix all.
pub fn refused_file(file: &str, refusals: &[Refusal]) -> WorkloadError {
    let mut reason = String::from("refused by the admission policy: ");
    for (i, refusal) in refusals.iter().enumerate() {
        if i == 0 {
            reason.push_str(&refusal.reason);
        } else {
            reason.push_str(&format!("; also {refusal}"));
        }
    }
    WorkloadError {
        file: file.to_owned(),
        field: refusals
            .first()
            .map(|r| r.field.clone())
            .unwrap_or_default(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_a_config_error_and_no_file_is_strict() {
        assert_eq!(load_policy(None).unwrap(), AdmissionPolicy::default());
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        assert!(matches!(
            load_policy(Some(&missing)),
            Err(PolicyFileError::Read { .. })
        ));
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[workloads.w]\ncap_add = [\"NET ADMIN\"]\n").unwrap();
        let err = load_policy(Some(&bad)).unwrap_err().to_string();
        assert!(err.contains("workloads.w.cap_add[0]"), "{err}");
    }

    #[test]
    fn a_refused_file_names_its_first_field_and_lists_every_refusal() {
        let refusals = [
            Refusal {
                field: "user".into(),
                reason: "runs as root".into(),
            },
            Refusal {
                field: "network_mode".into(),
                reason: "host".into(),
            },
        ];
        let e = refused_file("w.yaml", &refusals);
        assert_eq!(e.field, "user");
        assert_eq!(
            e.to_string(),
            "w.yaml: field `user`: refused by the admission policy: runs as root; also field `network_mode`: host"
        );
    }
}
