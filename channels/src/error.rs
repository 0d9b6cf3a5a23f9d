use std::io;

/// Errors of the memory-channel layer.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Os {
        /// The operation that failed.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A received memfd is missing the seals that keep its size stable.
    #[error("received memfd lacks required seals (has {have:#x}, needs {need:#x}): a peer could truncate it and fault us; refusing to map it")]
    MissingSeals {
        /// Seals present on the fd.
        have: i32,
        /// Seals required.
        need: i32,
    },
    /// A received memfd is smaller than the protocol said it would be.
    #[error("received memfd is {have} bytes but {need} are required")]
    TooSmall {
        /// Size of the fd.
        have: u64,
        /// Size required.
        need: u64,
    },
    /// Ring parameters are unusable.
    #[error("invalid ring geometry: {0}")]
    Geometry(&'static str),
    /// The peer wrote an impossible value into shared ring state.
    #[error("ring state corrupted by peer: {0}")]
    Corrupt(&'static str),
    /// A message does not fit in one ring slot.
    #[error("message of {len} bytes exceeds the ring slot payload of {max} bytes")]
    MessageTooLarge {
        /// Message length.
        len: usize,
        /// Largest payload a slot holds.
        max: usize,
    },
    /// The peer sent something other than what the protocol expects.
    #[error("protocol violation on control socket: {0}")]
    Protocol(&'static str),
}

impl ChannelError {
    pub(crate) fn os(op: &'static str) -> Self {
        ChannelError::Os {
            op,
            source: io::Error::last_os_error(),
        }
    }
}
