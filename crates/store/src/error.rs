//! The store's error enum: what a caller can do about a failed statement.

use flotilla_core::{Classify, ErrorClass, IllegalTransition};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The row changed since it was read (version or state moved); re-read and decide again.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The transition table forbids the write; nothing was written.
    #[error(transparent)]
    IllegalTransition(#[from] IllegalTransition),
    /// A unique constraint refused the row.
    #[error("duplicate: {0}")]
    Duplicate(String),
    /// What the write names refuses it for now and asking again will not
    /// help until an operator changes it (new instances for a pool that is
    /// being deleted, deleting a pool that has live instances). Nothing
    /// was written. The text says why and what to do.
    #[error("refused: {0}")]
    Refused(String),
    /// A row holds a value the code does not understand (a newer schema?).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The database could not be reached or did not answer in time.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Any other database failure.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl Classify for StoreError {
    fn class(&self) -> ErrorClass {
        match self {
            StoreError::Conflict(_) | StoreError::Unavailable(_) => ErrorClass::Retryable,
            StoreError::NotFound(_)
            | StoreError::IllegalTransition(_)
            | StoreError::Duplicate(_)
            | StoreError::Refused(_)
            | StoreError::Corrupt(_)
            | StoreError::Database(_) => ErrorClass::Permanent,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::RowNotFound => StoreError::NotFound("row".into()),
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                StoreError::Corrupt(e.to_string())
            }
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("23505") => {
                    StoreError::Duplicate(db.constraint().unwrap_or("unique constraint").to_owned())
                }
                // Serialization failure, deadlock: the other writer won; retry.
                Some("40001") | Some("40P01") => StoreError::Conflict(db.message().to_owned()),
                // Admin shutdown, cannot connect now: the server is going away.
                Some("57P01") | Some("57P02") | Some("57P03") => StoreError::Unavailable(e),
                _ => StoreError::Database(e),
            },
            _ => StoreError::Database(e),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
