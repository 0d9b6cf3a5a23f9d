//! The vhost-user message guard: checks every memory-region descriptor a
//! frontend sends before the vhost-user library can map it.
//!
//! `vhost-user-backend` 0.24 maps `SET_MEM_TABLE` and `ADD_MEM_REG` file
//! descriptors inside its request handler, `VhostUserHandler`, which is private
//! to the crate; the only backend callback, `VhostUserBackend::update_memory`,
//! runs after the regions are mapped and already published to the vrings. So
//! part-io does not hand the frontend's socket to `VhostUserDaemon` directly:
//! the daemon connects to a private socket (in a fresh 0700 directory) and the
//! guard relays messages between the two, frame by frame (12-byte header, body
//! of the size the header gives, file descriptors attached to the header).
//! Control messages only: kicks and interrupts go through eventfds and guest
//! memory is accessed in place, so the guard is not on the data path.
//!
//! One protocol repair happens here too: QEMU's virtio-net (7.2) sends
//! `SET_VRING_ENABLE` when the device is realized, before `SET_FEATURES`, and
//! `vhost-user-backend` 0.24 ends the connection over it ("inactive feature")
//! because `VHOST_USER_F_PROTOCOL_FEATURES` is not acked yet. The guard holds
//! such early requests back (acknowledging them if asked to) and replays the
//! last state of each ring right after `SET_FEATURES` acks the feature
//! (`EarlyEnables`).
//!
//! Files: `message` frames messages on the sockets, `regions` checks
//! memory tables, `early` holds early ring enables back; this file relays.
//!
//! A memory region passes only if its file descriptor carries the seals
//! `F_SEAL_SHRINK` and `F_SEAL_GROW` (so the VMM can never shrink it under a
//! mapping and turn a guest access into SIGBUS in part-io), is not on
//! hugetlbfs, and the region lies inside the file. Ring descriptors must be
//! eventfds and are made non-blocking (`fds`); early ring enables are held
//! for at most `early::MAX_RINGS` rings. A failing region is logged, counted, and ends the
//! connection before anything is mapped; other exports are not affected.

use std::io;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use channels::ChannelError;
use partvisor_runtime::sync::MutexExt;

mod early;
mod fds;
mod message;
mod regions;

use early::{Early, EarlyEnables};
use message::{recv, send, MAX_BODY};
pub use regions::check_region;

/// Why the guard ended a connection.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    #[error("message body of {0} bytes exceeds the vhost-user limit of {MAX_BODY}")]
    TooLarge(usize),
    #[error("{0} memory regions but {1} file descriptors in {2}")]
    FdCount(usize, usize, &'static str),
    #[error("malformed {0} message body ({1} bytes)")]
    BadBody(&'static str, usize),
    #[error(
        "memory region {index} (guest {gpa:#x}, {size:#x} bytes) refused: \
         its fd is not sealed against {missing} (F_GET_SEALS = {seals:#x}); \
         the VMM must create guest memory with MFD_ALLOW_SEALING and add \
         F_SEAL_SHRINK|F_SEAL_GROW"
    )]
    Unsealed {
        index: usize,
        gpa: u64,
        size: u64,
        seals: i32,
        missing: &'static str,
    },
    #[error(
        "memory region {index} (guest {gpa:#x}, {size:#x} bytes): cannot read seals: {source}"
    )]
    Seals {
        index: usize,
        gpa: u64,
        size: u64,
        source: ChannelError,
    },
    #[error(
        "memory region {index} (guest {gpa:#x}): offset {offset:#x} + size {size:#x} \
         exceeds the file size {file_size:#x}"
    )]
    OutsideFile {
        index: usize,
        gpa: u64,
        offset: u64,
        size: u64,
        file_size: u64,
    },
    #[error("{0} is refused: part-io does not offer dirty-page logging")]
    Refused(&'static str),
    #[error("{what}: the descriptor is {kind}, not an eventfd")]
    NotEventfd { what: &'static str, kind: String },
    #[error(
        "memory region {index} (guest {gpa:#x}, {size:#x} bytes) refused: it is on hugetlbfs \
         (its pages cannot be sealed against a hole punched under part-io's mapping)"
    )]
    Hugetlb { index: usize, gpa: u64, size: u64 },
    #[error("SET_VRING_ENABLE for ring {0} before SET_FEATURES: no device has that many rings")]
    EarlyRing(u32),
    #[error(
        "the memory table maps {total:#x} bytes in all, more than the {limit:#x} bytes the partition was granted"
    )]
    TooMuchMemory { total: u64, limit: u64 },
}

impl GuardError {
    /// True if the connection ended because of a memory region check.
    pub fn is_region_refusal(&self) -> bool {
        matches!(
            self,
            GuardError::Unsealed { .. }
                | GuardError::Seals { .. }
                | GuardError::OutsideFile { .. }
                | GuardError::Hugetlb { .. }
                | GuardError::TooMuchMemory { .. }
        )
    }
}

/// Relays messages between `frontend` and the daemon's end `backend` until
/// either side closes or a message fails a check; then shuts both down.
/// `memory_limit` is the partition's grant in bytes: a memory table that
/// maps more in total is refused.
pub fn relay(
    frontend: UnixStream,
    backend: UnixStream,
    memory_limit: Option<u64>,
) -> Result<(), GuardError> {
    let (f2, b2) = (frontend.try_clone()?, backend.try_clone()?);
    // Both threads may write to the frontend: one message at a time.
    let to_frontend = Arc::new(Mutex::new(()));
    let to_frontend2 = to_frontend.clone();
    // Replies (and any backend-initiated message) go back unchanged.
    let replies = std::thread::Builder::new()
        .name("part-io-guard-reply".into())
        .spawn(move || {
            let mut buf = Vec::new();
            while let Ok(Some(msg)) = recv(&b2, std::mem::take(&mut buf)) {
                let sent = {
                    let _one = to_frontend2.locked();
                    send(&f2, &msg)
                };
                if sent.is_err() {
                    break;
                }
                buf = msg.body;
            }
            let _ = f2.shutdown(Shutdown::Both);
            let _ = b2.shutdown(Shutdown::Both);
        })?;
    let result = (|| {
        let mut buf = Vec::new();
        let mut early = EarlyEnables::default();
        let mut budget = regions::MemoryBudget::new(memory_limit);
        while let Some(msg) = recv(&frontend, std::mem::take(&mut buf))? {
            regions::check(&msg)?;
            budget.apply(&msg)?;
            fds::check(&msg)?;
            match early.filter(&msg)? {
                Early::Hold(reply) => {
                    if let Some(reply) = reply {
                        let _one = to_frontend.locked();
                        send(&frontend, &reply)?;
                    }
                }
                Early::Forward(then) => {
                    send(&backend, &msg)?;
                    for m in &then {
                        send(&backend, m)?;
                    }
                }
            }
            buf = msg.body;
        }
        Ok(())
    })();
    let _ = frontend.shutdown(Shutdown::Both);
    let _ = backend.shutdown(Shutdown::Both);
    let _ = replies.join();
    result
}
