//! The broker's one error type, and the one place where errors become what a client
//! sees (`ErrorBody`): a refusal keeps its stable code and message; anything else is
//! logged here and answered `INTERNAL`, so no internal detail reaches the wire.

use switchboard_protocol::{ErrorBody, ErrorCode};
use switchboard_storage::StoreError;

/// Why the broker could not start, serve or stop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store failed (I/O, corruption, durability lost).
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A file or socket operation failed. The OS error is in the message, not also
    /// the error's source: printed with its causes (`{:#}`) it was said twice.
    #[error("{context}: {error}")]
    Io {
        /// What was being done, e.g. "binding UDP 127.0.0.1:4433".
        context: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// The certificate, key or TLS/QUIC configuration is unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// The data dir cannot be used (another broker holds its store, or it is damaged).
    #[error("data dir: {0}")]
    DataDir(String),
    /// A request refused with a stable code (as sent to the client).
    #[error("{0}")]
    Refused(ErrorBody),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |error| Error::Io { context, error }
    }

    /// A TLS or certificate error.
    pub fn tls(e: impl std::fmt::Display) -> Error {
        Error::Tls(e.to_string())
    }
}

impl From<Error> for ErrorBody {
    fn from(e: Error) -> ErrorBody {
        match e {
            Error::Refused(body) => body,
            other => internal(other),
        }
    }
}

impl From<ErrorBody> for Error {
    fn from(body: ErrorBody) -> Error {
        Error::Refused(body)
    }
}

/// Maps a failure that is not the client's doing to the wire: logged with its detail,
/// answered `INTERNAL` without it.
pub fn internal(e: impl std::fmt::Display) -> ErrorBody {
    tracing::error!(error = %e, "internal error");
    ErrorBody::new(ErrorCode::INTERNAL, "internal error")
}
