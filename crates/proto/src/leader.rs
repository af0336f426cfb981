//! What a standby server answers, and how a client reads it: the one
//! contract between `boilerhoused` replicas and their clients (agents and
//! `bh`), kept here so both sides build and read the same status.
//!
//! Several replicas share one database and one of them leads. A standby
//! refuses every RPC but health checks with UNAVAILABLE and says who leads
//! in ASCII metadata (sent as a header of a trailers-only response, so a
//! client sees it before any message):
//!
//! - [`LEADER_METADATA`]: the leader's client URL, absent while the standby
//!   knows of no leader;
//! - [`STANDBY_METADATA`]: present on every standby refusal, so a client can
//!   tell "a standby did nothing" from an UNAVAILABLE of the leader itself
//!   (its database restarting, say), after which a write may or may not have
//!   happened.
//!
//! The server builds the refusal with [`standby_status`]; clients test it
//! with [`is_standby`] and follow [`leader_hint`].

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// Metadata key of a standby's refusal: the leader's client URL
/// (`https://10.0.0.5:7600`).
pub const LEADER_METADATA: &str = "boilerhouse-leader";

/// Metadata key every standby refusal carries (value `true`), also when no
/// leader is known.
pub const STANDBY_METADATA: &str = "boilerhouse-standby";

/// The UNAVAILABLE a standby answers every call but health checks with,
/// naming `leader` (its client URL) when one is known.
pub fn standby_status(leader: Option<&str>) -> Status {
    let mut metadata = MetadataMap::new();
    metadata.insert(STANDBY_METADATA, MetadataValue::from_static("true"));
    let leader = leader.map(str::trim).filter(|l| !l.is_empty());
    let message = match leader {
        Some(leader) => {
            // A URL that cannot be a header (non-ASCII) is still named in
            // the message, for a person; clients only follow the metadata.
            if let Ok(value) = MetadataValue::try_from(leader) {
                metadata.insert(LEADER_METADATA, value);
            }
            format!("this server is a standby; the leader is {leader}")
        }
        None => "this server is a standby; no leader is known yet".to_owned(),
    };
    Status::with_metadata(Code::Unavailable, message, metadata)
}

/// The leader a refusal names, if any.
pub fn leader_hint(status: &Status) -> Option<String> {
    let value = status
        .metadata()
        .get(LEADER_METADATA)?
        .to_str()
        .ok()?
        .trim();
    (!value.is_empty()).then(|| value.to_owned())
}

/// Whether `status` is a standby's refusal: the call did nothing, so it is
/// safe to send again elsewhere, whatever it was.
pub fn is_standby(status: &Status) -> bool {
    status.code() == Code::Unavailable
        && (status.metadata().contains_key(STANDBY_METADATA)
            || status.metadata().contains_key(LEADER_METADATA))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_leader_in_message_and_metadata() {
        let status = standby_status(Some("https://10.0.0.5:7600"));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "this server is a standby; the leader is https://10.0.0.5:7600"
        );
        assert_eq!(
            leader_hint(&status).as_deref(),
            Some("https://10.0.0.5:7600")
        );
        assert!(is_standby(&status));
    }

    #[test]
    fn a_refusal_without_a_leader_is_still_a_standby_s() {
        for leader in [None, Some(""), Some("  ")] {
            let status = standby_status(leader);
            assert_eq!(leader_hint(&status), None);
            assert!(is_standby(&status), "{status:?}");
            assert!(status.message().contains("no leader is known"));
        }
    }

    #[test]
    fn other_unavailables_are_not_a_standby_s() {
        assert!(!is_standby(&Status::unavailable("database restarting")));
        let mut other = standby_status(Some("https://a:7600"));
        *other.metadata_mut() = MetadataMap::new();
        assert!(!is_standby(&other));
        // The metadata on another code is not a refusal either.
        let mut metadata = MetadataMap::new();
        metadata.insert(STANDBY_METADATA, MetadataValue::from_static("true"));
        assert!(!is_standby(&Status::with_metadata(
            Code::Internal,
            "x",
            metadata
        )));
    }

    #[test]
    fn the_refusal_survives_the_wire_as_headers() {
        // Trailers-only: what the server sends and the client reads back.
        let response = standby_status(Some("http://127.0.0.1:7600")).into_http::<()>();
        let status = Status::from_header_map(response.headers()).expect("a status");
        assert!(is_standby(&status));
        assert_eq!(
            leader_hint(&status).as_deref(),
            Some("http://127.0.0.1:7600")
        );
    }

    #[test]
    fn a_leader_that_cannot_be_a_header_is_only_in_the_message() {
        let status = standby_status(Some("https://lé:7600"));
        assert_eq!(leader_hint(&status), None);
        assert!(is_standby(&status));
        assert!(status.message().contains("lé"));
    }
}
