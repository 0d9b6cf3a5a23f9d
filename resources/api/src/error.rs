//! Text that does not parse into one of the API's value types.

/// A value given as text was refused; the message says what is expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Invalid partition name.
    #[error("invalid partition name {name:?}: use 1-64 of [a-z0-9_.-], starting with a letter or digit, not 'available' or 'shared-pool'")]
    PartitionId {
        /// The refused name.
        name: String,
    },
    /// Invalid MAC address text.
    #[error("`{text}` is not a MAC address (six two-digit hex bytes separated by ':')")]
    Mac {
        /// The refused text.
        text: String,
    },
    /// Invalid serial console destination.
    #[error("serial {text:?}: expected stdout, none, file:PATH or socket:PATH")]
    Serial {
        /// The refused text.
        text: String,
    },
}
