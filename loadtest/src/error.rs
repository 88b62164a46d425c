//! The harness library's one error type. Each variant says what failed; its message is
//! what the `switchboard-load` binary prints, with the wrapped error as its cause.

use std::path::PathBuf;

use switchboard_client::ClientError;

/// Why a load run could not set up, run, stop or report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A client could not connect, authenticate or have a set-up request answered.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Registering the simulated users failed.
    #[error("enrolling users{}", enroll_hint(.0))]
    Enroll(#[source] ClientError),
    /// Creating a conversation was still rate limited after every retry.
    #[error("conversation creation still rate limited after {attempts} attempts")]
    RateLimited {
        /// Attempts made.
        attempts: u32,
    },
    /// The in-process broker could not start, serve or stop.
    #[error(transparent)]
    Broker(#[from] switchboard_broker::Error),
    /// A file, process or runtime operation failed.
    #[error("{context}")]
    Io {
        /// What was being done, e.g. "starting the embedded broker".
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The child broker process did not announce its address or exited with an error.
    #[error("{0}")]
    Child(String),
    /// A harness task panicked or was cancelled.
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
    /// A latency histogram could not be created.
    #[error(transparent)]
    Histogram(#[from] hdrhistogram::CreationError),
    /// The plot could not be drawn: no font, no file name, or a plotters failure.
    #[error("{0}")]
    Plot(String),
    /// Writing the plot to its file failed (the cause says why).
    #[error("writing plot {}", path.display())]
    WritingPlot {
        /// The plot's path.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: Box<Error>,
    },
    /// The NATS server of `fanout --against` could not be reached or used.
    #[error("NATS server {url}: {what}")]
    Nats {
        /// The server's URL.
        url: String,
        /// What failed, with the client's message.
        what: String,
    },
    /// The broker's store could not be opened or read after the run (`catchup`).
    #[error("reading the broker's store: {0}")]
    Store(String),
    /// The broker answered against the protocol (e.g. a catch-up page that is neither
    /// complete nor holds an entry, which would loop for ever).
    #[error("the broker broke the protocol: {0}")]
    Protocol(String),
    /// The arguments are malformed or inconsistent.
    #[error("{0}")]
    InvalidArgs(String),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}

/// plotters errors are generic over the backend; only their message is kept.
impl<E: std::error::Error + Send + Sync> From<plotters::drawing::DrawingAreaErrorKind<E>> for Error {
    fn from(e: plotters::drawing::DrawingAreaErrorKind<E>) -> Self {
        Error::Plot(e.to_string())
    }
}

/// What to change when a broker the harness does not own refuses its registrations (or
/// their connections).
fn enroll_hint(e: &ClientError) -> &'static str {
    if matches!(e, ClientError::Untrusted(_)) {
        // rustls's own words (`BadSignature`, `UnknownIssuer`) do not say which flag to
        // change (a load tester's trial).
        return " (--ca or --pin is not the certificate of the broker at --target: give its cert.pem, from its \
                 data dir, or the sha256 it prints at start)";
    }
    if matches!(e, ClientError::Refused(_)) {
        return " (the broker refused the connection: a broker load-tested with --target needs \
                 max_connections_per_address = 0, all simulated devices coming from one address, and \
                 max_connections above the run's devices; README, \"Load testing\")";
    }
    match e.code() {
        Some(switchboard_protocol::ErrorCode::RATE_LIMITED) => {
            " (the broker limits registrations per address: a broker load-tested with --target needs \
             registration_burst_per_address raised, and argon2_queue; README, \"Load testing\")"
        }
        Some(switchboard_protocol::ErrorCode::OVERLOADED) => {
            " (the broker's password queue stayed full for a minute: raise its argon2_queue, or lower \
             argon2_memory_kib for a test broker; README, \"Load testing\")"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA or pin that is not the broker's names the flags to change, not only rustls's
    /// words for the signature.
    #[test]
    fn an_untrusted_broker_names_the_trust_flags() {
        let e = Error::Enroll(ClientError::Untrusted("invalid peer certificate: BadSignature".into()));
        let text = format!("{e}");
        assert!(text.contains("--ca or --pin is not the certificate of the broker at --target"), "{text}");
    }
}
