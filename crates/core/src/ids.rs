//! Typed identifiers. Every id in the system is a newtype so that a tenant
//! id can never be passed where a node id is expected, and so that
//! validation happens once, at the edge, when the id is constructed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
pub use uuid::Uuid;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct IdError {
    /// What kind of id was being parsed, e.g. "tenant id".
    pub kind: &'static str,
    /// The rejected input, truncated for display.
    pub value: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

impl IdError {
    fn new(kind: &'static str, value: &str, reason: &'static str) -> Self {
        let value: String = value.chars().take(64).collect();
        Self {
            kind,
            value,
            reason,
        }
    }
}

/// A DNS label: 1–63 characters of `[a-z0-9-]`, starting and ending with a
/// letter or digit. Node names and workload ids use it so they are safe in
/// Docker labels, container names, file names and URLs alike.
fn check_dns_label(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::new(kind, s, "must not be empty"));
    }
    if s.len() > 63 {
        return Err(IdError::new(kind, s, "must be at most 63 characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(IdError::new(
            kind,
            s,
            "may contain only lowercase letters, digits and '-'",
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(IdError::new(
            kind,
            s,
            "must start and end with a letter or digit",
        ));
    }
    Ok(())
}

macro_rules! label_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check_dns_label($kind, &s)?;
                Ok(Self(s))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

label_id!(
    /// A node's name, from its agent's config. Stable across restarts; the
    /// server never invents one, so labels still make sense after the
    /// database is lost.
    NodeId,
    "node id"
);
label_id!(
    /// A workload's id, from its YAML.
    WorkloadId,
    "workload id"
);

/// A pool is identified by its workload: one pool per workload. The alias
/// keeps the intent visible at call sites without a second string type that
/// would need converting back and forth.
pub type PoolId = WorkloadId;

/// A tenant id: opaque to Boilerhouse, 1–128 characters of `[A-Za-z0-9._-]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(String);

impl TenantId {
    /// Validates and wraps `s`.
    pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        const KIND: &str = "tenant id";
        if s.is_empty() {
            return Err(IdError::new(KIND, &s, "must not be empty"));
        }
        if s.len() > 128 {
            return Err(IdError::new(KIND, &s, "must be at most 128 characters"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(IdError::new(
                KIND,
                &s,
                "may contain only letters, digits, '.', '_' and '-'",
            ));
        }
        // "." and ".." would be dangerous as path components in sync prefixes.
        if s.bytes().all(|b| b == b'.') {
            return Err(IdError::new(KIND, &s, "must not consist only of dots"));
        }
        Ok(Self(s))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({:?})", self.0)
    }
}

impl FromStr for TenantId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::new(s)
    }
}

impl TryFrom<String> for TenantId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::new(s)
    }
}

impl From<TenantId> for String {
    fn from(id: TenantId) -> String {
        id.0
    }
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// Wraps a UUID given by the caller; id generation needs a
            /// clock and randomness, so it happens outside `core`.
            pub fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The UUID inside.
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Uuid::parse_str(s)
                    .map(Self)
                    .map_err(|_| IdError::new($kind, s, "must be a UUID"))
            }
        }
    };
}

uuid_id!(
    /// A managed container's id: a server-assigned UUIDv7. The Docker name
    /// is `bh-<id>`, which makes a repeated create find its twin.
    ContainerId,
    "container id"
);
uuid_id!(
    /// A boost's id: a server-assigned UUIDv7.
    BoostId,
    "boost id"
);

impl ContainerId {
    /// The Docker container name for this id.
    pub fn docker_name(&self) -> String {
        format!("bh-{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn node_ids_are_dns_labels() {
        assert!(NodeId::new("node-a").is_ok());
        assert!(NodeId::new("n1").is_ok());
        assert!(NodeId::new("").is_err());
        assert!(NodeId::new("Node-A").is_err());
        assert!(NodeId::new("-a").is_err());
        assert!(NodeId::new("a-").is_err());
        assert!(NodeId::new("a_b").is_err());
        assert!(NodeId::new("a".repeat(64)).is_err());
        assert!(NodeId::new("a".repeat(63)).is_ok());
    }

    #[test]
    fn tenant_ids_follow_the_documented_alphabet() {
        assert!(TenantId::new("t1").is_ok());
        assert!(TenantId::new("Org_1.user-2").is_ok());
        assert!(TenantId::new("a".repeat(128)).is_ok());
        assert!(TenantId::new("a".repeat(129)).is_err());
        assert!(TenantId::new("").is_err());
        assert!(TenantId::new("a/b").is_err());
        assert!(TenantId::new("..").is_err());
        assert!(TenantId::new("a b").is_err());
        let err = TenantId::new("a/b").unwrap_err();
        assert_eq!(err.kind, "tenant id");
    }

    #[test]
    fn container_names_carry_the_id() {
        let id = ContainerId::from_uuid(Uuid::nil());
        assert_eq!(id.docker_name(), "bh-00000000-0000-0000-0000-000000000000");
        assert_eq!(id.to_string().parse::<ContainerId>().unwrap(), id);
        assert!("nope".parse::<ContainerId>().is_err());
    }

    proptest! {
        #[test]
        fn tenant_id_validation_never_panics_and_round_trips(s in ".{0,200}") {
            if let Ok(id) = TenantId::new(s.clone()) {
                prop_assert_eq!(id.as_str(), s.as_str());
                prop_assert!(!s.is_empty() && s.len() <= 128);
            }
        }

        #[test]
        fn valid_tenant_ids_are_accepted(s in "[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}") {
            prop_assert!(TenantId::new(s).is_ok());
        }
    }
}
