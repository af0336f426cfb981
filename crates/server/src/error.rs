//! API errors and the one mapping from them to `tonic::Status`.
//!
//! The client gets a message written for it; internal detail (database
//! errors, paths) is logged here, where the error is handled, and replaced
//! by a generic sentence in the response.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use boilerhouse_proto::convert::ConvertError;

use crate::store::StoreError;

/// What went wrong with an API call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field is missing or invalid.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field, as named in the request message.
        field: String,
        /// Why.
        reason: String,
    },
    /// Several request fields are refused at once, each for its reason;
    /// clients get one field violation per field, so all can be fixed in
    /// one go.
    #[error("{}", join_violations(.0))]
    InvalidFields(Vec<(String, String)>),
    /// The named thing does not exist.
    #[error("{what} {id:?} not found")]
    NotFound {
        /// What kind of thing.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// Nothing matches, described in a sentence.
    #[error("{0}")]
    Missing(String),
    /// It exists already, or a request_id was reused for another request.
    #[error("{0}")]
    AlreadyExists(String),
    /// The system is not in a state that allows this.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Out of capacity; retry later.
    #[error("{message}")]
    ResourceExhausted {
        /// What ran out.
        message: String,
        /// When a retry makes sense.
        retry_after: Duration,
    },
    /// Not enough capacity; waiting will not help unless something is
    /// released, so no retry time is given, but the shortfall is.
    #[error("{message}")]
    CapacityShort {
        /// The sentence.
        message: String,
        /// What is short, e.g. `node/a:cpu`.
        subject: String,
        /// Needed, free and preemptible.
        description: String,
    },
    /// A dependency (database, Docker, an agent) is unavailable.
    #[error("{0}")]
    Unavailable(String),
    /// The RPC belongs to a capability that is not built yet.
    #[error("{0} is not implemented yet")]
    Unimplemented(&'static str),
    /// The caller gave no valid credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this; the message names what it would need.
    #[error("{0}")]
    PermissionDenied(String),
    /// A bug or an unexpected failure; detail is logged, not returned.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// An invalid field.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

fn join_violations(violations: &[(String, String)]) -> String {
    violations
        .iter()
        .map(|(field, reason)| format!("{field}: {reason}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<ConvertError> for ApiError {
    fn from(e: ConvertError) -> Self {
        let field = e.field().to_owned();
        let reason = match e {
            ConvertError::MissingField(_) => "is required".to_owned(),
            ConvertError::Invalid { reason, .. } => reason,
        };
        ApiError::InvalidArgument { field, reason }
    }
}

impl From<boilerhouse_core::auth::Denied> for ApiError {
    fn from(d: boilerhouse_core::auth::Denied) -> Self {
        match d {
            boilerhouse_core::auth::Denied::Unauthenticated(m) => ApiError::Unauthenticated(m),
            boilerhouse_core::auth::Denied::PermissionDenied(m) => ApiError::PermissionDenied(m),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_database_unreachable() {
            // A read while the database restarts, say: nothing happened,
            // and the client should try again, not report a bug.
            tracing::warn!(error = %e, "database unreachable");
            return ApiError::Unavailable(
                "the database cannot be reached right now; try again shortly".into(),
            );
        }
        match e {
            StoreError::Unavailable(detail) => {
                tracing::error!(error = %detail, "store unavailable");
                ApiError::Unavailable(
                    "the database cannot take writes right now; nothing was changed".into(),
                )
            }
            StoreError::Closed => ApiError::Unavailable("the server is shutting down".into()),
            StoreError::NotLeader(detail) => ApiError::Unavailable(format!(
                "this server is no longer the leader ({detail}); try another server"
            )),
            StoreError::Conflict(detail) => ApiError::AlreadyExists(detail),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::InvalidArgument { field, reason } => {
                let message = format!("{field}: {reason}");
                let mut details = ErrorDetails::new();
                details.add_bad_request_violation(field, reason);
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            ApiError::InvalidFields(violations) => {
                let message = join_violations(&violations);
                let mut details = ErrorDetails::new();
                for (field, reason) in violations {
                    details.add_bad_request_violation(field, reason);
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            ApiError::NotFound { .. } => Status::not_found(e.to_string()),
            ApiError::Missing(m) => Status::not_found(m),
            ApiError::AlreadyExists(m) => Status::already_exists(m),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::ResourceExhausted {
                message,
                retry_after,
            } => {
                let mut details = ErrorDetails::new();
                details.set_retry_info(Some(retry_after));
                Status::with_error_details(Code::ResourceExhausted, message, details)
            }
            ApiError::CapacityShort {
                message,
                subject,
                description,
            } => {
                let mut details = ErrorDetails::new();
                details.add_quota_failure_violation(subject, description);
                Status::with_error_details(Code::ResourceExhausted, message, details)
            }
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::Unauthenticated(m) => Status::unauthenticated(m),
            ApiError::PermissionDenied(m) => Status::permission_denied(m),
            ApiError::Unimplemented(capability) => Status::unimplemented(format!(
                "{capability} is not implemented in this version of boilerhoused"
            )),
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                Status::internal("internal error; see the server log")
            }
        }
    }
}

/// Shorthand for handler results.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    #[test]
    fn invalid_arguments_carry_a_field_violation() {
        let status = Status::from(ApiError::invalid("tenant_id", "is required"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "tenant_id: is required");
        let details = status.get_error_details();
        let violations = &details.bad_request().unwrap().field_violations;
        assert_eq!(violations[0].field, "tenant_id");
    }

    #[test]
    fn several_invalid_fields_carry_one_violation_each() {
        let status = Status::from(ApiError::InvalidFields(vec![
            ("yaml.user".into(), "runs as root".into()),
            ("yaml.network_mode".into(), "host".into()),
        ]));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "yaml.user: runs as root; yaml.network_mode: host"
        );
        let details = status.get_error_details();
        let fields: Vec<&str> = details
            .bad_request()
            .unwrap()
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["yaml.user", "yaml.network_mode"]);
    }

    #[test]
    fn internal_detail_is_not_sent_to_clients() {
        let status = Status::from(ApiError::Internal("disk /var/x: EIO".into()));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("EIO"));
    }

    #[test]
    fn a_database_out_of_reach_is_unavailable_not_internal() {
        for e in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        ] {
            let status = Status::from(ApiError::from(StoreError::from(e)));
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        }
        let bug = StoreError::from(sqlx::Error::RowNotFound);
        assert_eq!(Status::from(ApiError::from(bug)).code(), Code::Internal);
    }

    #[test]
    fn exhaustion_carries_retry_info() {
        let status = Status::from(ApiError::ResourceExhausted {
            message: "pool full".into(),
            retry_after: Duration::from_secs(2),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        assert_eq!(
            details.retry_info().unwrap().retry_delay,
            Some(Duration::from_secs(2))
        );
    }
}
