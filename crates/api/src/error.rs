//! Store errors as gRPC statuses: the one place the api decides what a
//! failed statement means to a caller.
//!
//! Design notes: the match has no wildcard arm, so a new store error must be
//! classified here before the api compiles. Database failures are logged
//! with their detail and answered with a bare INTERNAL: SQL text, constraint
//! names and connection strings stay on the server.

use flotilla_store::StoreError;
use tonic::Status;

/// A pool the request names does not exist: the one answer of every call
/// that takes a pool (listing, watching, selecting, provisioning), so a
/// typo is never an empty list, a silent stream or a bad argument.
pub fn pool_not_found(name: &str) -> Status {
    Status::not_found(format!("pool {name} does not exist"))
}

/// The status a store error is answered with.
pub fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(what) => Status::not_found(format!("not found: {what}")),
        StoreError::Conflict(why) => Status::aborted(format!("changed concurrently: {why}")),
        StoreError::IllegalTransition(t) => Status::failed_precondition(t.to_string()),
        StoreError::Refused(why) => Status::failed_precondition(why),
        StoreError::Duplicate(constraint) => Status::already_exists(match constraint.as_str() {
            "pools_pkey" => "pool: a pool with this name already exists",
            "instances_pool_name_live" => {
                "names: a live instance of the pool already has one of these names"
            }
            _ => "already exists",
        }),
        StoreError::Unavailable(source) => {
            tracing::warn!(error = %source, "database unavailable");
            Status::unavailable("database unavailable, retry later")
        }
        StoreError::Corrupt(detail) => {
            tracing::error!(error = %detail, "corrupt row");
            Status::internal("internal error")
        }
        StoreError::Database(source) => {
            tracing::error!(error = %source, "database error");
            Status::internal("internal error")
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn each_store_error_has_its_code_and_sql_never_leaks() {
        let cases = [
            (StoreError::NotFound("pool x".into()), Code::NotFound),
            (StoreError::Conflict("version".into()), Code::Aborted),
            (
                StoreError::Refused("pool p is being deleted".into()),
                Code::FailedPrecondition,
            ),
            (
                StoreError::Duplicate("pools_pkey".into()),
                Code::AlreadyExists,
            ),
            (
                StoreError::Unavailable(sqlx::Error::PoolTimedOut),
                Code::Unavailable,
            ),
            (StoreError::Corrupt("state \"x\"".into()), Code::Internal),
            (
                StoreError::Database(sqlx::Error::Protocol("SELECT secret FROM t".into())),
                Code::Internal,
            ),
        ];
        for (e, code) in cases {
            let s = store_status(e);
            assert_eq!(s.code(), code);
            assert!(!s.message().contains("SELECT"), "{}", s.message());
        }
    }
}
