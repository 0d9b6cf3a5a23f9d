//! What the coordinator refuses or fails at, each with the data a user
//! needs to act and the error that caused it. The HTTP status is the
//! error's own ([`CoordError::status`]), never a guess from its text.

use std::path::PathBuf;

use axum::http::StatusCode;
use resource_db::{Error as DbError, ParseError, PartitionId, PartitionState, Rejection};

use crate::access::AccessError;
use crate::definition::{CmdlineError, DefinitionError};
use crate::io::IoError;
use crate::process::ProcessError;

/// Errors of the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    // ----- the request is wrong (400) -----
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    #[error(transparent)]
    Name(#[from] ParseError),
    #[error("cannot start {id}: socket path {path} is longer than {max} bytes (the Unix socket limit); give partd a shorter --state-dir, or use shorter partition and switch names")]
    SocketPathTooLong {
        id: PartitionId,
        path: PathBuf,
        max: usize,
    },

    // ----- the caller may not (403) -----
    /// A file of the definition the creating (or owning) uid cannot open.
    #[error("{action} {id}: {source}")]
    Access {
        action: &'static str,
        id: PartitionId,
        source: AccessError,
    },
    #[error("{action} {id}: uid {uid} is not its owner (uid {}); only the owner and root may", owner.map_or("none, root only".to_string(), |o| o.to_string()))]
    NotOwner {
        action: &'static str,
        id: PartitionId,
        uid: u32,
        owner: Option<u32>,
    },

    // ----- no such partition (404) -----
    #[error("no partition named {id}; `partctl list` shows the defined ones")]
    NotFound { id: PartitionId },

    // ----- the partition's state or the host does not allow it (409) -----
    #[error("partition {id} is already {state}")]
    AlreadyActive {
        id: PartitionId,
        state: PartitionState,
    },
    #[error("partition {id} is {state}, not running")]
    NotRunning {
        id: PartitionId,
        state: PartitionState,
    },
    #[error("partition {id} is {state}; `partctl stop {id}` it first")]
    StillActive {
        id: PartitionId,
        state: PartitionState,
    },
    #[error("partition {id} already exists; `partctl destroy {id}` it first or pick another name")]
    Exists { id: PartitionId },
    /// The definition was valid at create but is not now (a file is gone).
    #[error("cannot start {id}: {source}")]
    NoLongerValid {
        id: PartitionId,
        source: DefinitionError,
    },
    #[error("cannot start {id}: {source}")]
    Cmdline {
        id: PartitionId,
        source: CmdlineError,
    },
    #[error("cannot {action} {id}: {reason}; nothing was allocated (`partctl resources` shows what is free)")]
    Capacity {
        action: &'static str,
        id: PartitionId,
        reason: Rejection,
    },
    #[error("cannot start {id}: switch {switch} (part-io pid {pid}) has no port for it and cannot be restarted while partitions are connected to it ({}); stop them, then start {id} first (the switch is then started with a port for every partition defined on it)", busy.join(", "))]
    SwitchBusy {
        id: PartitionId,
        switch: String,
        pid: u32,
        busy: Vec<String>,
    },
    #[error("partition {id} ended while starting ({state}): {why}; see {}", log.display())]
    EndedWhileStarting {
        id: PartitionId,
        state: PartitionState,
        why: String,
        log: PathBuf,
    },

    // ----- something did not answer in time (504) -----
    #[error("partition {id}: its monitor did not answer within {secs} s; it stays `starting` (see {})", log.display())]
    StartTimeout {
        id: PartitionId,
        secs: u64,
        log: PathBuf,
    },
    #[error("partition {id}: monitor pid {pid} did not end after SIGKILL")]
    KillTimeout { id: PartitionId, pid: u32 },

    // ----- partd or the host failed (500) -----
    #[error("resource database: {0}")]
    Db(#[from] DbError),
    #[error("stored definition of {id}: {source}")]
    StoredDefinition {
        id: PartitionId,
        source: serde_json::Error,
    },
    #[error("cannot encode the definition of {id}: {source}")]
    EncodeDefinition {
        id: PartitionId,
        source: serde_json::Error,
    },
    #[error("{id}: {what}; try again")]
    Contended { id: PartitionId, what: &'static str },
    #[error("partition {id} is {state} but partd supervises no monitor for it")]
    NotSupervised {
        id: PartitionId,
        state: PartitionState,
    },
    #[error("cannot start {id}: {source}")]
    Monitor {
        id: PartitionId,
        source: ProcessError,
    },
    #[error("cannot start {id}: {source}")]
    Backend { id: PartitionId, source: IoError },
    #[error("partition {id} has no MAC for its NIC {nic}")]
    NoMac { id: PartitionId, nic: usize },
    #[error("partition {id} was granted no vsock CID for its [vsock] section")]
    NoCid { id: PartitionId },
    #[error("cannot start {id}: {source}")]
    Vsock {
        id: PartitionId,
        source: crate::io::VsockControlError,
    },
    #[error("cannot create {path}: {source}")]
    SwitchDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("switch {switch}: part-io pid {pid} did not end")]
    SwitchStuck { switch: String, pid: u32 },
    #[error("{id} holds no uids for its processes (destroy and create it again)")]
    NoUids { id: PartitionId },
    #[error("cannot confine the processes of {id}: {source}")]
    Confine {
        id: PartitionId,
        source: partvisor_jail::JailError,
    },
    #[error("cannot set the owner of {path}: {source}")]
    Ownership {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl CoordError {
    /// The HTTP status partd answers this error with.
    pub fn status(&self) -> StatusCode {
        use CoordError::*;
        match self {
            Definition(_) | Name(_) | SocketPathTooLong { .. } => StatusCode::BAD_REQUEST,
            NotFound { .. } => StatusCode::NOT_FOUND,
            NotOwner { .. } => StatusCode::FORBIDDEN,
            Access { source, .. } => match source {
                AccessError::Symlink { .. } | AccessError::NotAFile { .. } => {
                    StatusCode::BAD_REQUEST
                }
                AccessError::Denied { .. } | AccessError::CannotSwitch { .. } => {
                    StatusCode::FORBIDDEN
                }
                AccessError::Credentials { .. } | AccessError::Thread { .. } => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
            },
            AlreadyActive { .. }
            | NotRunning { .. }
            | StillActive { .. }
            | Exists { .. }
            | NoLongerValid { .. }
            | Cmdline { .. }
            | Capacity { .. }
            | SwitchBusy { .. }
            | EndedWhileStarting { .. } => StatusCode::CONFLICT,
            StartTimeout { .. } | KillTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Db(_)
            | StoredDefinition { .. }
            | EncodeDefinition { .. }
            | Contended { .. }
            | NotSupervised { .. }
            | Monitor { .. }
            | Backend { .. }
            | NoMac { .. }
            | NoCid { .. }
            | Vsock { .. }
            | SwitchDir { .. }
            | SwitchStuck { .. }
            | NoUids { .. }
            | Confine { .. }
            | Ownership { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p1() -> PartitionId {
        PartitionId::new("p1").unwrap()
    }

    #[test]
    fn status_follows_the_kind_of_error_not_its_text() {
        let cases = [
            (CoordError::Name(PartitionId::new("Bad").unwrap_err()), 400),
            (CoordError::NotFound { id: p1() }, 404),
            (
                CoordError::AlreadyActive {
                    id: p1(),
                    state: PartitionState::Running,
                },
                409,
            ),
            (
                CoordError::Capacity {
                    action: "start",
                    id: p1(),
                    reason: Rejection::EmptyTransaction,
                },
                409,
            ),
            (
                CoordError::StartTimeout {
                    id: p1(),
                    secs: 30,
                    log: "/x/vmm.log".into(),
                },
                504,
            ),
            (
                CoordError::Contended {
                    id: p1(),
                    what: "state kept changing",
                },
                500,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.status().as_u16(), want, "{e}");
        }
    }

    #[test]
    fn messages_name_the_partition_and_what_to_do() {
        let e = CoordError::StillActive {
            id: p1(),
            state: PartitionState::Running,
        };
        assert_eq!(
            e.to_string(),
            "partition p1 is running; `partctl stop p1` it first"
        );
        let e = CoordError::SwitchBusy {
            id: p1(),
            switch: "lan".into(),
            pid: 7,
            busy: vec!["a".into(), "b".into()],
        };
        assert!(e.to_string().contains("connected to it (a, b)"), "{e}");
        let e = CoordError::EndedWhileStarting {
            id: p1(),
            state: PartitionState::Failed,
            why: "reason=triple-fault".into(),
            log: "/s/vmm.log".into(),
        };
        assert_eq!(
            e.to_string(),
            "partition p1 ended while starting (failed): reason=triple-fault; see /s/vmm.log"
        );
    }
}
