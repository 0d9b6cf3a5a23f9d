use channels::ChannelError;

/// Errors returned by verbs calls (as opposed to work-completion statuses,
/// which report the outcome of a posted work request).
#[derive(Debug, thiserror::Error)]
pub enum IcError {
    /// A shared-memory channel operation failed.
    #[error("memory channel: {0}")]
    Channel(#[from] ChannelError),
    /// A socket or other OS call failed.
    #[error("{op}: {source}")]
    Io {
        /// What we were doing.
        op: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The object still has dependants (e.g. a PD with live MRs or QPs).
    #[error("{what} is busy: {detail}; destroy those first")]
    Busy {
        /// Object kind.
        what: &'static str,
        /// What still uses it.
        detail: String,
    },
    /// A work queue or completion queue is full.
    #[error("{0} is full (depth reached); poll completions before posting more")]
    QueueFull(&'static str),
    /// The QP is not in a state that allows the call.
    #[error("queue pair is {state}: {hint}")]
    InvalidState {
        /// Current state.
        state: String,
        /// What the caller can do.
        hint: &'static str,
    },
    /// An argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The peer is not on the endpoint's allowlist.
    #[error("connection refused: {0}")]
    Refused(String),
    /// The directory has no such endpoint.
    #[error("no endpoint named {0:?} in the directory")]
    UnknownEndpoint(String),
    /// The peer spoke something other than this protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Waiting for the peer took too long.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The completion queue overflowed; completions were lost.
    #[error("completion queue overflowed: create it deeper than the sum of its QPs' depths")]
    CqOverflow,
    /// The kernel's random source failed (keys and nonces come from it).
    #[error("random bytes for a key or nonce: {0}")]
    Random(getrandom::Error),
    /// The access layer was closed.
    #[error("access layer is closed")]
    Closed,
}

impl IcError {
    pub(crate) fn io(op: impl Into<String>, source: std::io::Error) -> Self {
        IcError::Io {
            op: op.into(),
            source,
        }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, IcError>;
